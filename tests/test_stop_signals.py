"""megatron's checkpoint helper processes ignore the stop signals from their first instruction
(``stop_signals.stop_signals_ignored_by_new_processes``): a SIGTERM to every process of the
job while one is still importing would otherwise kill it, and the save waiting on it would hang."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

from megatron_tst.stop_signals import STOP_SIGNALS, stop_signals_ignored_by_new_processes
from tests.conftest import REPO


def ignored_signals(pid: int) -> set[int]:
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_a_process_started_inside_ignores_the_stop_signals_at_once():
    ctx = mp.get_context("spawn")
    with stop_signals_ignored_by_new_processes():
        child = ctx.Process(target=time.sleep, args=(60,))
        child.start()
    outside = ctx.Process(target=time.sleep, args=(60,))
    outside.start()
    try:
        wanted = {getattr(signal, name) for name in STOP_SIGNALS}
        assert wanted <= ignored_signals(child.pid)  # before the child ran a line of Python
        # outside: only what this process ignores itself (a shell's background job: SIGINT)
        assert ignored_signals(outside.pid) & wanted <= ignored_signals(os.getpid())
        assert signal.SIGTERM not in ignored_signals(os.getpid())
        os.kill(child.pid, signal.SIGTERM)
        os.kill(outside.pid, signal.SIGTERM)
        outside.join(timeout=600)
        child.join(timeout=2)
        assert outside.exitcode == -signal.SIGTERM and child.is_alive()
    finally:
        for p in (child, outside):
            p.kill()
            p.join(timeout=600)


def test_this_process_gets_its_handlers_and_signal_mask_back():
    handler = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGUSR2, handler)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    try:
        with stop_signals_ignored_by_new_processes():
            assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN
            assert signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, set())
        assert signal.getsignal(signal.SIGUSR2) is handler
        assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == mask
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_the_results_queue_process_starts_without_importing_torch():
    """The process megatron's write results come back through (``async_save.start_results_queue``)
    imports only what unpickling its initializer needs: every run with checkpoints waits for
    its start, and importing torch there cost two seconds of each."""
    code = """
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron_tst.training import async_save
async_save.start_results_queue()
manager = filesystem_async._results_queue._manager
with open(f"/proc/{manager._process.pid}/maps") as f:
    print("libtorch" in f.read(), manager._process.is_alive())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, cwd=REPO)
    assert out.stdout.split() == ["False", "True"], out.stderr[-3000:]
