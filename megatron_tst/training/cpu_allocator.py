"""Host allocator setting for training on the CPU: freed memory stays in the process.

glibc's ``malloc`` serves every block of 128 KiB or more (the threshold adapts up to 32 MiB) with
its own ``mmap`` and gives it back to the kernel on ``free``, and trims the heap top past 128 KiB.
A CPU training step allocates and frees activations and gradients of many MiB each, so every step
maps them again and the kernel zero-fills each page on first touch: on this project's 2-core
machine that page-fault work was more than half of a step of a 0.16B-parameter model
(``docs/benchmarks.md``). CUDA training never pays it (torch's caching allocator keeps freed
blocks); on the CPU, glibc keeps them when ``mmap`` is off (``M_MMAP_MAX = 0``) and trimming is
off (``M_TRIM_THRESHOLD = -1``), the documented ``mallopt`` settings behind the
``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables. The price is the
caching allocator's: the resident set stays at its peak.

``training/distributed.py`` applies it when CUDA is absent, after the compatibility layer;
``MEGATRON_TST_CPU_MALLOC=default`` leaves glibc's defaults (e.g. a CPU job sharing memory with
others). Other C libraries (musl) have no ``mallopt``: nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os

from megatron_tst.config import ConfigError

__all__ = ["ENV", "keep_freed_memory"]

log = logging.getLogger("megatron_tst")

ENV = "MEGATRON_TST_CPU_MALLOC"
M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_MAX = -4

_state: dict = {}


def keep_freed_memory() -> bool:
    """Keep freed blocks in the process's heap (glibc); once per process. True when in effect.

    Returns False, changing nothing, when ``MEGATRON_TST_CPU_MALLOC`` is ``default`` or the C
    library has no ``mallopt``. Any other value of the variable is an error (a typo would
    otherwise silently keep the slow default)."""
    if "on" in _state:
        return _state["on"]
    choice = os.environ.get(ENV, "keep").strip().lower()
    if choice not in ("keep", "default"):
        raise ConfigError("expected 'keep' (the default: freed memory stays in the process) or "
                          "'default' (glibc's own settings)", key=ENV, value=os.environ[ENV],
                          source="environment")
    on = False
    if choice == "keep":
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is None:
            log.info("the C library has no mallopt: the host allocator keeps its defaults")
        else:
            mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            mallopt.restype = ctypes.c_int
            on = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, -1) == 1
            if not on:
                log.warning("mallopt refused the settings: freed memory may go back to the OS")
    _state["on"] = on
    return on
