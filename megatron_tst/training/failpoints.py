"""Fault injection for the reliability tests: ``MEGATRON_TST_FAILPOINT=<point>[@step]``.

Points: the ``save:*`` and ``prune:*`` points of ``training/checkpoint.py`` (the process is
killed with SIGKILL there), and ``grad:nan`` (rank 0 writes a NaN into its gradients after the
data-parallel reduction of that step, which only the non-finite check can then notice). Unset,
every call is one environment lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


def active(point: str, step: int) -> bool:
    want = os.environ.get("MEGATRON_TST_FAILPOINT")
    if not want:
        return False
    name, _, at = want.partition("@")
    return name == point and (not at or int(at) == step)


def kill_if(point: str, step: int) -> None:
    """SIGKILL this process at ``point`` if it is the active failpoint."""
    if active(point, step):
        log.warning("failpoint %s at step %d: killing the process", point, step)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
