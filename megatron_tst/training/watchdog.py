"""Hang watchdog: a rank on which no step finishes within ``training.hang_timeout_minutes``
dumps its Python stacks, writes ``exit_status.json`` and exits with ``EXIT_HANG`` (76).

A hang (a rank stopped, deadlocked, stuck in I/O, or waiting in a collective for a rank that
is) never ends on its own before the process-group timeout (``parallel.timeout_minutes``, 30
minutes by default), and then only as a traceback of the collective that timed out. The
watchdog is a daemon thread that the training loop feeds with ``beat()`` (after every step,
every validation batch, before and after every save): one ``time.monotonic()`` store. When no
beat comes within the timeout, the thread writes every thread's Python stack (``faulthandler``)
to ``<run_dir>/hang/rank<R>.txt``, writes ``exit_status.json`` (``failed``, reason ``hang``,
the last completed step and checkpoint; every rank whose watchdog fires writes it, since rank
0 may be the hung one), logs one line and ends the process with ``os._exit(76)``: the main
thread is stuck, so nothing else could end it. A rank that is stopped (SIGSTOP) or holds the
GIL cannot run its watchdog: the ranks waiting for it fire theirs, and the launcher (torchrun,
Slurm) ends the rest. See docs/reliability.md#hangs.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from megatron_tst.training.signals import EXIT_HANG, FAILED, write_exit_status

log = logging.getLogger("megatron_tst")

HANG = "hang"  # the exit_status.json reason
# (last completed step, last complete checkpoint or None, skipped steps so far)
Progress = Callable[[], tuple[int, Optional[str], int]]


class HangWatchdog:
    """``timeout_minutes`` None: off (``beat`` and ``close`` do nothing, no thread).

    ``progress`` is called once, when the watchdog fires, from its own thread. ``exit`` ends the
    process (``os._exit``; tests pass their own). ``backend``: with ``nccl`` the directory of
    NCCL's flight-recorder dumps (``distributed.flight_recorder_env``) is created too.
    """

    def __init__(self, timeout_minutes: Optional[float], run_dir: str | Path, rank: int,
                 train_steps: int, progress: Progress, *, backend: str = "gloo",
                 process_group_minutes: Optional[float] = None,
                 exit: Callable[[int], object] = os._exit):
        self.timeout_s = None if timeout_minutes is None else timeout_minutes * 60
        self.run_dir, self.rank, self.train_steps = Path(run_dir), rank, train_steps
        self.progress, self._exit = progress, exit
        self.fired = threading.Event()
        self._closed = threading.Event()
        self._last = time.monotonic()
        self._thread: Optional[threading.Thread] = None
        if self.timeout_s is not None or backend == "nccl":
            (self.run_dir / "hang").mkdir(parents=True, exist_ok=True)
        if self.timeout_s is None:
            return
        if process_group_minutes is not None and process_group_minutes <= timeout_minutes:
            log.warning("training.hang_timeout_minutes=%g is not below parallel.timeout_minutes="
                        "%g: a rank waiting in a collective fails on the process-group timeout "
                        "first, without the watchdog's stacks and exit status",
                        timeout_minutes, process_group_minutes)
        # Checks often enough to fire within ~2% of the timeout (and at most 5 s late).
        self._poll_s = min(max(self.timeout_s / 50, 0.05), 5.0)
        self._thread = threading.Thread(target=self._watch, name="megatron-tst-hang-watchdog",
                                        daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.timeout_s is not None

    def beat(self) -> None:
        """Progress was made (a step, a validation batch, a save)."""
        self._last = time.monotonic()

    def close(self) -> None:
        """Stop watching (the loop ended); waits for the thread unless it is firing."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(self._poll_s * 2, 1.0))

    # ------------------------------------------------------------------------------ thread
    def _watch(self) -> None:
        while not self._closed.wait(self._poll_s):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        self.fired.set()
        try:
            step, checkpoint, skipped = self.progress()
        except Exception:  # noqa: BLE001 - the report must still be written
            step, checkpoint, skipped = -1, None, 0
        stacks = self.run_dir / "hang" / f"rank{self.rank}.txt"
        try:
            self._dump_stacks(stacks, idle, step)
        except OSError as err:
            log.error("hang watchdog: could not write %s: %s", stacks, err)
        try:
            write_exit_status(self.run_dir, status=FAILED, step=step,
                              train_steps=self.train_steps, checkpoint=checkpoint,
                              signal_name=None, reason=HANG, skipped_steps=skipped, final=True)
        except OSError as err:
            log.error("hang watchdog: could not write exit_status.json: %s", err)
        log.error("rank %d: no training step finished for %.0f s (training.hang_timeout_minutes="
                  "%g) after step %d: hung. Python stacks of this rank in %s; exiting with status "
                  "%d. Compare the ranks' stacks in %s to find the rank that is elsewhere, then "
                  "resubmit: the run resumes from its last checkpoint (%s).", self.rank, idle,
                  self.timeout_s / 60, step, stacks, EXIT_HANG, stacks.parent, checkpoint or "none")
        _flush_logs()
        self._exit(EXIT_HANG)

    def _dump_stacks(self, path: Path, idle: float, step: int) -> None:
        names = {t.ident: t.name for t in threading.enumerate()}
        with open(path, "w") as f:
            f.write(f"hang: rank {self.rank} on {socket.gethostname()} (pid {os.getpid()}): no "
                    f"step finished for {idle:.1f} s (training.hang_timeout_minutes="
                    f"{self.timeout_s / 60:g}); last completed step {step}; "
                    f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
            f.write("threads: " + ", ".join(f"{ident:#018x} {name}" for ident, name
                                             in names.items()) + "\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)


def _flush_logs() -> None:
    """Flush (not close: the main thread may hold a handler) every handler and the streams."""
    for logger in (logging.getLogger(), log):
        for handler in logger.handlers:
            try:
                handler.flush()
            except Exception:  # noqa: BLE001
                pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
