"""A torchrun worker ends itself, and its children, when its agent dies (training/distributed.py
``watch_launcher``): real processes, the agent killed with SIGKILL as the OOM killer would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.conftest import REPO

WORKER = textwrap.dedent("""
    import subprocess, sys, time
    from megatron_tst.training.distributed import watch_launcher
    child = subprocess.Popen(["sleep", "600"])  # as a data-loader worker or a checkpoint writer
    watch_launcher(poll_s=0.05)
    print(child.pid, flush=True)
    time.sleep(600)
""")
AGENT = textwrap.dedent("""
    import os, subprocess, sys, time
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=env,
                              start_new_session=True)  # as torchrun starts its workers
    print(worker.pid, flush=True)
    time.sleep(600)
""")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_worker_ends_with_its_killed_agent_and_takes_its_children(tmp_path):
    agent = subprocess.Popen([sys.executable, "-c", AGENT, WORKER], stdout=subprocess.PIPE,
                             text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        worker = int(agent.stdout.readline())
        child = int(agent.stdout.readline())  # printed once the watch runs
        time.sleep(0.5)
        assert alive(worker) and alive(child), "the watch must not fire while the agent lives"
        agent.kill()
        agent.wait()
        deadline = time.time() + 60  # a hang guard: it takes about 0.05 s
        while (alive(worker) or alive(child)) and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(worker), "the worker outlived its agent"
        assert not alive(child), "the worker's child outlived the agent"
    finally:
        for pid in [agent.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
