"""Stop cleanly on a signal: finish the step, save, exit with a status a launcher can act on.

Slurm sends SIGTERM when it preempts or requeues a job and, with ``--signal=B:USR1@T``, SIGUSR1
ahead of the time limit; ``training.time_limit_minutes`` does the same from inside the job. A handler for each name in ``training.exit_signals`` only records the
signal; after every step the ranks agree on it (one MAX all-reduce of the signal number, so a
signal that reached a single rank stops them all at the same step), the trainer saves a
checkpoint and the process exits with ``EXIT_PREEMPTED``. Every ``train`` command ends by
writing ``<run_dir>/exit_status.json`` (``write_exit_status``), which launchers read, because
``torchrun`` reports any non-zero worker exit as its own status 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megatron_tst.config.signals import signal_number

if TYPE_CHECKING:
    import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved and stopped early; resubmit (requeue) to continue
EXIT_HANG = 76  # no step finished within training.hang_timeout_minutes (training/watchdog.py)
FINISHED, PREEMPTED, STOPPED, FAILED = "finished", "preempted", "stopped", "failed"
TIME_LIMIT = "time_limit"  # the stop reason when training.time_limit_minutes is reached


class ExitSignalHandler:
    """Records the exit signals from construction (before the slow set-up, so a signal then is
    not lost); ``agreed()`` is a collective every rank calls after each step; ``blocked()``
    holds the signals back during a checkpoint save."""

    def __init__(self, names: list[str], device: Optional["torch.device"] = None):
        self.device = device  # set once the process group exists
        self.received = 0  # signal number, 0 = none
        self.numbers = sorted({signal_number(n) for n in names})
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread (e.g. not in tests' threads)
        for num in self.numbers:
            self._previous[num] = signal.signal(num, self._record)

    def _record(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, time_up: bool = False) -> Optional[str]:
        """The signal any rank received (the highest number if several), else ``TIME_LIMIT``
        if any rank's time is up, else None."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.received, int(time_up)], dtype=torch.int64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        num, late = int(flag[0]), int(flag[1])
        return signal.Signals(num).name if num else TIME_LIMIT if late else None

    @contextlib.contextmanager
    def blocked(self):
        """Hold the exit signals back (delivered, and recorded, when the block ends).

        Around checkpoint saves: the save is not interrupted, and the signal is acted on once
        it is written. Its writer processes survive a signal sent to every process of the job
        (torchrun, Slurm): a forked writer runs this process's handler, which only records the
        signal; megatron's spawned helpers ignore the stop signals
        (``megatron_tst.stop_signals``).
        """
        if not self.numbers or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, self.numbers)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def restore(self) -> None:
        for num, handler in self._previous.items():
            signal.signal(num, handler)
        self._previous.clear()


def write_exit_status(run_dir: str | Path, *, status: str, step: int, train_steps: int,
                      checkpoint: Optional[str], signal_name: Optional[str],
                      reason: Optional[str] = None, skipped_steps: int = 0,
                      final: bool = False) -> Path:
    """Atomically write ``exit_status.json`` (by global rank 0; a hang by every rank whose
    watchdog fires). ``reason``: ``signal`` or ``time_limit`` (preempted), ``nonfinite``,
    ``disk_full`` or ``hang`` (failed), else null; ``skipped_steps``: updates withheld by
    ``training.nonfinite=skip``. ``final``: this process writes no other status to this run
    directory afterwards (the hang watchdog's, racing the training loop's last write)."""
    path = Path(run_dir) / "exit_status.json"
    with _STATUS_LOCK:
        if path.resolve() in _FINAL:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        # unique per process on a shared file system: several ranks may write a hang at once
        tmp = path.parent / f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}"
        tmp.write_text(json.dumps({"status": status, "step": step, "train_steps": train_steps,
                                   "checkpoint": checkpoint, "signal": signal_name,
                                   "reason": reason, "skipped_steps": skipped_steps},
                                  indent=2) + "\n")
        os.replace(tmp, path)
        if final:
            _FINAL.add(path.resolve())
    return path


_STATUS_LOCK = threading.Lock()
_FINAL: set[Path] = set()  # exit_status.json files this process wrote with final=True
