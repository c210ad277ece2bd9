"""The supported megatron-core lines, and everything that differs between them.

megatron-tst is tested on two (Python, megatron-core) pairs, the ones pip resolves from setup.py's
pins: Python 3.11 with megatron-core 0.16.1 and Python 3.12 with 0.19.2 (the line of the GPU image,
NGC PyTorch on Python 3.12). Every version check in the project lives here; the rest of the code
asks this module (``at_least``) instead of comparing versions itself.

What differs, and where the project handles it:

- ``moe_utils.te_general_gemm`` is unbound without transformer-engine before 0.19 (the CPU
  compatibility layer's ``moe_te_general_gemm`` patch, applied only where ``Patch.mcore`` matches).
- From 0.19, ``dist_checkpointing`` keeps a checkpoint's common state inside the sharded files
  (no ``common.pt``). 0.19 still reads the older layout, so a checkpoint of 0.16.1 resumes on 0.19;
  releases before 0.19 cannot read the new one, so ``unreadable_checkpoint`` refuses that resume
  with one line naming both versions (``training/checkpoint.py``).
- megatron's persistent checkpoint writer (``PersistentAsyncCaller``) is started per caller
  before 0.19 and once per process from 0.19 (``_get_process``, with two more loop arguments);
  ``training/async_save.py`` starts it with the run either way (``SHARED_CHECKPOINT_WORKER``),
  and the process of megatron's write-results queue too (``filesystem_async._results_queue``,
  the same module global in both lines).
- The legacy tokenizer base class ``megatron.core.datasets.megatron_tokenizer`` is gone in 0.19;
  the project's tokenizers derive from ``megatron.core.tokenizers.MegatronTokenizerBase``, which
  both lines ship unchanged (no adapter needed).

This module imports no megatron-core code (it reads package metadata), so start-up checks can use
it before the seconds-long import.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

# Python "major.minor" -> the megatron-core release CI tests with it. setup.py pins the same
# (a test compares them), and the Dockerfile's build refuses an image whose pair is not here.
TESTED = {"3.11": "0.16.1", "3.12": "0.19.2"}


@functools.lru_cache(maxsize=None)
def installed() -> Version:
    """The installed megatron-core version (from package metadata; megatron is not imported)."""
    try:
        return Version(importlib.metadata.version("megatron-core"))
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "megatron-core is not installed: install megatron-tst with pip (pip install -e .), "
            "which pins the megatron-core release tested with this Python") from None


def python_line() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def at_least(version: str) -> bool:
    return installed() >= Version(version)


def matches(specifier: str) -> bool:
    """Whether the installed megatron-core is in ``specifier`` (PEP 440; empty: every version)."""
    return installed() in SpecifierSet(specifier)


COMMON_STATE_IN_SHARDS = Version("0.19")  # dist_checkpointing: no common.pt from this release
SHARED_CHECKPOINT_WORKER = "0.19"  # PersistentAsyncCaller._get_process: one worker per process


def unreadable_checkpoint(written_by: str | None) -> str | None:
    """None when the installed megatron-core reads a checkpoint that megatron-core ``written_by``
    saved (None: not recorded, i.e. an older megatron-tst); else why it cannot, and the fix."""
    try:
        writer = Version(written_by) if written_by else None
    except InvalidVersion:
        return None
    now = installed()
    if writer is None or not (writer >= COMMON_STATE_IN_SHARDS > now):
        return None
    python = next((p for p, v in TESTED.items() if Version(v) == writer), None)
    where = f" (Python {python}: pip install -e . there)" if python else ""
    return (f"it was written by megatron-core {written_by}, which keeps the checkpoint's common "
            f"state inside the sharded files, a layout megatron-core {now} cannot read; resume it "
            f"with megatron-core {written_by}{where}")


def tested_pair() -> str | None:
    """None when (this Python, the installed megatron-core) is a pair CI tests; else why not."""
    python, version = python_line(), str(installed())
    expected = TESTED.get(python)
    if expected == version:
        return None
    pairs = ", ".join(f"Python {p} with megatron-core {v}" for p, v in TESTED.items())
    return (f"megatron-core {version} on Python {python} is not a tested pair (tested: {pairs}); "
            f"reinstall with `pip install -e .` in a Python {'/'.join(TESTED)} environment to get "
            f"the tested release")


def main() -> int:
    """``python -m megatron_tst.mcore``: exit 0 when this environment is a tested pair, else print
    why not and exit 1 (the Dockerfile's build runs it, so the image holds what CI tested)."""
    untested = tested_pair()
    if untested:
        print(f"megatron-tst: {untested}", file=sys.stderr)
        return 1
    print(f"megatron-core {installed()} on Python {python_line()}: a tested pair")
    return 0


if __name__ == "__main__":
    sys.exit(main())
