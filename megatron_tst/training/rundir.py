"""The run directory: one training process group at a time, and its own records.

``RunLock`` is taken by global rank 0 before the run writes anything: an exclusive ``flock`` on
``<run_dir>/run.lock``, which the kernel releases when the holder dies however it dies (so a
stale lock never blocks a resume, a requeued Slurm job included), and the holder's host, pid,
start time and Slurm job in the file, so that a second ``train`` on the same directory refuses at
once with one line naming the holder. ``write_run_config`` writes ``run_config.yaml``, the
resolved config of the latest start of the run.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.config.loader import config_to_yaml

LOCK = "run.lock"


def make_run_dir(cfg: RunConfig) -> Path:
    """``<run_dir>``, created if needed; a path that cannot be created is a ConfigError."""
    run_dir = Path(cfg.resolved_run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the run directory {run_dir} ({err.strerror or err}); "
                          f"set run_dir to a writable location", key="run_dir",
                          value=cfg.run_dir) from None
    return run_dir


class RunLock:
    """An exclusive lock on a run directory for the life of this process (or ``release()``)."""

    def __init__(self, cfg: RunConfig):
        import fcntl

        self.path = make_run_dir(cfg) / LOCK
        try:
            self._file = open(self.path, "a+")
        except OSError as err:
            raise ConfigError(f"cannot open the run lock {self.path} ({err.strerror or err}); "
                              f"set run_dir to a writable location", key="run_dir",
                              value=cfg.run_dir) from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder()
            self._file.close()
            raise ConfigError(
                f"{self.path.parent} is in use by another training run ({holder}): two runs on "
                f"one run directory would overwrite each other's checkpoints and metrics. Wait "
                f"for it to end (or stop it), or give this run another run_dir",
                key="run_dir", value=cfg.run_dir) from None
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "slurm_job": os.environ.get("SLURM_JOB_ID")}
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def _holder(self) -> str:
        """Who holds the lock, as its file says (read defensively: it may be half written)."""
        try:
            record = json.loads(self.path.read_text(errors="replace") or "{}")
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict) or "pid" not in record:
            return "holder unknown"
        job = f", Slurm job {record['slurm_job']}" if record.get("slurm_job") else ""
        return (f"pid {record.get('pid')} on {record.get('host')}, started "
                f"{record.get('started')}{job}")

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the descriptor drops the flock


def lock_run_dir(cfg: RunConfig, rank: int) -> Optional[RunLock]:
    """The run directory's lock on global rank 0 (None on the other ranks)."""
    return RunLock(cfg) if rank == 0 else None


def write_run_config(cfg: RunConfig) -> Path:
    path = make_run_dir(cfg) / "run_config.yaml"
    path.write_text(config_to_yaml(cfg))
    return path
