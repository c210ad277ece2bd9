"""Fault injection for the reliability tests: ``MEGATRON_TST_FAILPOINT=<point>[@step[+]]``
(``@3``: at step 3 only; ``@3+``: at step 3 and every later one; no step: always).

Points: the ``save:*`` and ``prune:*`` points of ``training/checkpoint.py`` (the process is
killed with SIGKILL there; ``save:disk_full`` instead fails the write with ENOSPC, and
``save:signal`` sends SIGTERM right after a background save starts, its writers held 2 s;
``save:slow_copy`` starts the copy of a CPU background save's state 2 s late),
``grad:nan`` (rank 0 writes a NaN into its gradients after the data-parallel reduction of that step, which
only the non-finite check can then notice) and ``eval:signal`` (the process sends itself SIGTERM
during the first validation batch after that step). Unset, every call is one environment lookup.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def active(point: str, step: int) -> bool:
    want = os.environ.get("MEGATRON_TST_FAILPOINT")
    if not want:
        return False
    name, _, at = want.partition("@")
    if name != point:
        return False
    if at.endswith("+"):
        return step >= int(at[:-1])
    return not at or int(at) == step


def kill_if(point: str, step: int) -> None:
    """SIGKILL this process at ``point`` if it is the active failpoint."""
    if active(point, step):
        log.warning("failpoint %s at step %d: killing the process", point, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def signal_if(point: str, step: int, signum: int = signal.SIGTERM,
              children: bool = False) -> None:
    """Send ``signum`` at ``point`` if it is the active failpoint to this process, and with
    ``children`` first to every process it started (checkpoint writers and their helpers), as
    Slurm signals every process of a job step."""
    if active(point, step):
        import psutil

        log.warning("failpoint %s at step %d: sending %s", point, step,
                    signal.Signals(signum).name)
        for child in psutil.Process().children(recursive=True) if children else ():
            try:
                child.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        os.kill(os.getpid(), signum)


def fill_disk_if(step: int, step_dir: Path, rank: int) -> None:
    """``save:disk_full``: write part of this rank's first file, then fail with ENOSPC."""
    if active("save:disk_full", step):
        part = Path(step_dir) / f"__{rank}_0.distcp"
        part.write_bytes(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(part))
