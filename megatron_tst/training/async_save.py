"""Checkpoint saves in the background: megatron-core's own ``dist_checkpointing`` async save.

``checkpoint.async_save: true``. A save builds the sharded state dict and plans the write as a
synchronous save does, then megatron's ``AsyncCallsQueue`` forks a writer process per rank
(``TemporalAsyncCaller``; GPU tensors are first copied to host memory) and training goes on. After
every step the ranks ask whether all writers are done (``BackgroundSaves.poll``, one all-reduce,
only while a save is pending); once they are, the finalization runs on every rank at the same
step: megatron's metadata, then the completion record, ``latest`` and retention exactly as after
a synchronous save (``checkpoint.py``). So ``latest`` only ever names a checkpoint whose every
file is written and checksummed, and a process killed at any point leaves it on the previous one.

The writer process also checksums the files it wrote (``__<rank>_*.distcp``) and leaves the
figures in ``.digests-rank<R>.json`` in the step directory, read and removed at finalization:
the training processes never read the checkpoint back. A write that failed on any rank (reported
by megatron on every rank, or by a digest file) raises ``SaveError`` on every rank; the partial
directory is removed and never becomes ``latest``.

Why fork, on the CPU too: the writer must see the state as it was when the save was scheduled.
On a GPU the tensors are copied to host memory before the fork; on the CPU that copy is a no-op
(``Tensor.to("cpu")`` returns the tensor itself) and the fork's copy-on-write memory is the
snapshot. megatron's persistent worker (a spawned process fed through a queue) would share the
live CPU tensors instead, so it is not used.
"""

from __future__ import annotations

import errno
import functools
import inspect
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

from megatron_tst.training import failpoints
from megatron_tst.training.saved import digest_files

log = logging.getLogger(__name__)


def digest_file_name(rank: int) -> str:
    return f".digests-rank{rank}.json"


def request(state: dict, path: Path):
    """The ``AsyncRequest`` of a save of ``state`` to ``path`` (megatron-core's own async
    machinery: ``async_strategy='mcore'`` where the installed version also offers NVRx)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    kwargs = {"async_sharded_save": True}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        kwargs["async_strategy"] = "mcore"
    return dist_checkpointing.save(state, str(path), get_default_save_sharded_strategy(),
                                   **kwargs)


def _write_and_digest(write: Callable, path: str, rank: int, step: int, *args, **kwargs) -> None:
    """The writer process: megatron's write, then the CRC32s of this rank's files, left in
    ``.digests-rank<R>.json`` (or the error that stopped it)."""
    if failpoints.active("save:signal", step):  # the save is still pending at the signal
        time.sleep(2)
    write(*args, **kwargs)
    out = Path(path) / digest_file_name(rank)
    try:
        failpoints.fill_disk_if(step, Path(path), rank)  # a write that fills the disk
        names = sorted(p.name for p in Path(path).glob(f"__{rank}_*.distcp"))
        report = {"files": digest_files(Path(path), names=names)}
    except Exception as err:  # reported at finalization, on every rank
        report = {"error": f"{type(err).__name__}: {err}",
                  "enospc": isinstance(err, OSError) and err.errno == errno.ENOSPC}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, out)


def gather_digests(path: Path) -> tuple[dict, list[str], bool]:
    """At finalization, on every rank: (the digests the writers left, covering their ``.distcp``
    files; the writers' errors; whether one was a full disk). Each rank reads and removes its own
    digest file; a rank whose writer left none contributes nothing (its files are then
    checksummed by ``checkpoint.py`` like the metadata files)."""
    own = path / digest_file_name(dist.get_rank())
    try:
        mine = json.loads(own.read_text())
        if not isinstance(mine, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        mine = {}
    except (OSError, ValueError) as err:
        log.warning("%s is unreadable (%s): its files are checksummed again", own, err)
        mine = {}
    own.unlink(missing_ok=True)
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, mine)
    files, errors, enospc = {}, [], False
    for rank, share in enumerate(shares):
        if "error" in share:
            errors.append(f"rank {rank}: {share['error']}")
            enospc = enospc or bool(share.get("enospc"))
        elif isinstance(share.get("files"), dict):
            files.update(share["files"])
    return files, errors, enospc


class BackgroundSaves:
    """At most one save in flight. ``schedule``, ``poll`` and ``wait`` are called at the same
    steps on every rank (``poll`` and ``wait`` are collectives while a save is pending)."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue(persistent=False)
        self.pending: Optional[Path] = None
        self.scheduled_at = 0.0  # time.time() of the pending save's start
        self.duration_s = 0.0  # start to completion of the last completed save

    def schedule(self, req, path: Path, step: int, complete: Callable[[], None],
                 on_failure: Callable[[BaseException], BaseException]) -> None:
        """Start writing ``req`` (``request``) to ``path``; at finalization run megatron's
        finalize functions, then ``complete`` (the record, ``latest``, retention). An error there
        goes through ``on_failure``, which returns the exception to raise."""
        if self.pending is not None:
            raise RuntimeError(f"a save to {self.pending} is still pending: wait() first")
        writer = req.async_fn
        if writer is not None:  # None: this rank has nothing to write
            writer = functools.partial(_write_and_digest, writer, str(path), dist.get_rank(), step)
        finalize = functools.partial(self._finalize, list(req.finalize_fns), complete, on_failure)
        self.queue.schedule_async_request(req._replace(async_fn=writer, finalize_fns=[finalize]))
        self.pending, self.scheduled_at = path, time.time()

    @staticmethod
    def _finalize(megatron_fns: list, complete: Callable[[], None],
                  on_failure: Callable[[BaseException], BaseException]) -> None:
        try:
            for fn in megatron_fns:  # the global metadata; raises on every rank if a write failed
                fn()
            complete()
        except Exception as err:
            raise on_failure(err) from err

    def poll(self, wait: bool = False) -> Optional[Path]:
        """The save that completed now (its finalization ran), else None; ``wait``: block until
        the pending save is complete. Raises what ``on_failure`` made of a failed save."""
        if self.pending is None:
            return None
        path = self.pending
        try:
            done = self.queue.maybe_finalize_async_calls(blocking=wait)
        except BaseException:
            self.pending = None
            raise
        if not done:
            return None
        self.pending, self.duration_s = None, time.time() - self.scheduled_at
        return path

    def wait(self) -> Optional[Path]:
        return self.poll(wait=True)


def remove_partial(path: Path) -> None:
    """Rank 0 removes a failed save's directory (it never had a record, so never ``latest``)."""
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
