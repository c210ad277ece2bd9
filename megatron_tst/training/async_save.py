"""Checkpoint saves in the background: megatron-core's own ``dist_checkpointing`` async save.

``checkpoint.async_save: true``. A save builds the sharded state dict and plans the write as a
synchronous save does, then megatron's ``AsyncCallsQueue`` hands it to a writer process per rank
(on a GPU one forked per save, ``TemporalAsyncCaller``, after a copy to host memory; on the CPU
see below) and training goes on. After
every step the ranks ask whether all writers are done (``BackgroundSaves.poll``, one all-reduce,
only while a save is pending); once they are, the finalization runs on every rank at the same
step: megatron's metadata, then the completion record, ``latest`` and retention exactly as after
a synchronous save (``checkpoint.py``). So ``latest`` only ever names a checkpoint whose every
file is written and checksummed, and a process killed at any point leaves it on the previous one.

The writer process also checksums the files it writes (``__<rank>_*.distcp``, as it writes
them: ``write_digests.py``) and leaves the figures in ``.digests-rank<R>.json`` in the step
directory, read and removed at finalization: nothing reads the checkpoint back. A write that
failed on any rank (reported by megatron on every rank, or by a digest file) raises ``SaveError``
on every rank; the partial directory is removed and never becomes ``latest``.

The writer must see the state as it was when the save was scheduled. On a GPU megatron copies
the tensors to host memory and forks a writer (``TemporalAsyncCaller``). On the CPU that copy
would be a no-op (``Tensor.to("cpu")`` returns the tensor itself) and a forked writer shares the
pages of the live weights: the kernel then copies every page the next step rewrites, one fault
per page, which cost more than the save (``benchmarks/checkpoint_stall.py``). So on the CPU the
compatibility layer copies the state into shared memory at the save (``async_cpu_snapshot``;
``SharedStaging``: allocated at the first save, reused by every later one) and megatron's
persistent writer process (``PersistentAsyncCaller``, started with the run, one writer, at a
lower CPU priority) writes it: training shares no pages with it. The copy itself is made by a
thread while the next step's forward and backward run (they read the saved tensors and change
none of them), and is joined before megatron's ``finalize_model_grads`` (``release``), which
comes before the optimizer step and anything else that changes them; only then is the save
handed to the writer. With ``parallel.overlap_param_gather`` the next forward writes gathered
parameters, so the copy is made at the save.
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

import torch
import torch.distributed as dist

from megatron_tst import mcore
from megatron_tst.training import failpoints
from megatron_tst.training.saved import digest_files
from megatron_tst.training.write_digests import written_digests

log = logging.getLogger(__name__)


def digest_file_name(rank: int) -> str:
    return f".digests-rank{rank}.json"


def request(state: dict, path: Path, staging=None, defer: bool = False, hold_s: float = 0.0):
    """The ``AsyncRequest`` of a save of ``state`` to ``path`` (megatron-core's own async
    machinery: ``async_strategy='mcore'`` where the installed version also offers NVRx); CPU
    tensors copied into ``staging`` (``BackgroundSaves.staging``) when given: before this
    returns, or with ``defer`` by a thread that ``BackgroundSaves.release`` joins (``hold_s``:
    the thread starts copying that late, for tests)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy

    kwargs = {"async_sharded_save": True}
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        kwargs["async_strategy"] = "mcore"
    strategy = get_default_save_sharded_strategy()
    if staging is None:
        return dist_checkpointing.save(state, str(path), strategy, **kwargs)
    strategy.thread_count = 1  # one writer process: the CPU's other cores are training's
    with staging.active(defer=True):
        req = dist_checkpointing.save(state, str(path), strategy, **kwargs)
    staging.fill(background=defer, hold_s=hold_s)
    return req


def _write_and_digest(write: Callable, path: str, rank: int, step: int, *args, **kwargs) -> None:
    """The writer process: megatron's write, checksumming this rank's files as it writes them
    (``write_digests``), then their CRC32s left in ``.digests-rank<R>.json`` (or the error that
    stopped it)."""
    if failpoints.active("save:signal", step):  # the save is still pending at the signal
        time.sleep(2)
    with written_digests(Path(path)) as known:  # checksummed as they are written
        write(*args, **kwargs)
    out = Path(path) / digest_file_name(rank)
    try:
        failpoints.fill_disk_if(step, Path(path), rank)  # a write that fills the disk
        names = sorted(p.name for p in Path(path).glob(f"__{rank}_*.distcp"))
        rest = [name for name in names if name not in known]  # read back: not digested above
        report = {"files": {**{n: known[n] for n in names if n in known},
                            **digest_files(Path(path), names=rest)}}
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

    def __init__(self, overlap_snapshot: bool = True):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        # GPU: a writer forked per save (megatron's default), the state copied to host memory
        # first. CPU: megatron's persistent writer process, started now, fed a copy of the state
        # in shared memory (compat ``async_cpu_snapshot``): a forked writer would share the
        # pages of the weights, and the kernel would copy each one that training rewrites.
        self.queue = AsyncCallsQueue(persistent=not torch.cuda.is_available())
        self.staging = None  # the CPU's reused shared-memory copy of the state
        if self.queue.persistent:
            from megatron_tst.compat.megatron_patches import SharedStaging

            self.staging = SharedStaging()
            _start_persistent_worker(self.queue)
        # CPU: the shared-memory copy is made by a thread during the next step's forward and
        # backward, and joined (``release``) before anything changes the saved state
        self.overlap = self.staging is not None and overlap_snapshot
        self.unsent = None  # the pending save's request, while its copy is being made
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
        req = req._replace(async_fn=writer, finalize_fns=[finalize])
        self.pending, self.scheduled_at = path, time.time()
        if self.staging is not None and self.staging.filling:
            self.unsent = req
        else:
            self.queue.schedule_async_request(req)

    def release(self) -> None:
        """The pending save's copy of the state complete, and the save handed to the writer: call
        before anything changes a saved tensor (the trainer: before megatron's
        ``finalize_model_grads``, which precedes the optimizer step and updates MoE expert
        biases, and before the TST switch). A no-op when there is nothing to release."""
        if self.unsent is None:
            return
        req, self.unsent = self.unsent, None
        try:
            self.staging.join()
        except BaseException:
            self.pending = None
            raise
        self.queue.schedule_async_request(req)

    def released_before(self, fn: Callable) -> Callable:
        """``fn`` that first calls ``release``."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.release()
            return fn(*args, **kwargs)
        return wrapper

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
        if self.pending is None or (self.unsent is not None and not wait):
            return None  # (the same on every rank: the copy is released at the same step)
        self.release()
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

    def close(self, abort: bool = False) -> None:
        """Stop the persistent writer process (``abort``: kill it, after a failure; otherwise
        call with no save pending)."""
        if self.staging is not None and self.staging.filling:
            try:
                self.staging.join()  # its buffers may not be freed under the thread
            except Exception:
                if not abort:
                    raise
        self.unsent = None
        queue_type = type(self.queue)  # 0.16.1 keeps the caller on the queue, 0.19 on its class
        caller = getattr(self.queue, "persistent_caller", None) or getattr(
            queue_type, "_persistent_caller", None)
        self.queue.close(abort=abort)
        if caller is not None:
            # the closed caller's __del__ closes it again, asking torch.distributed for the rank,
            # which fails (0.16.1) or warns (0.19) once the process group is gone, after the
            # run's last message (a traceback or the class can hold the caller until the
            # interpreter exits): that second close does nothing now
            caller.close = lambda abort=False: None
            if getattr(self.queue, "persistent_caller", None) is caller:
                self.queue.persistent_caller = None
            if getattr(queue_type, "_persistent_caller", None) is caller:
                queue_type._persistent_caller = None


def _start_persistent_worker(queue) -> None:
    """Start megatron's persistent writer process now, with the run, rather than at the first
    save, whose stall would then include the process's start-up (imports: seconds); as
    ``PersistentAsyncCaller.schedule_async_call`` starts it (``mcore.py``)."""
    import torch.multiprocessing as mp
    from megatron.core.dist_checkpointing.strategies import async_utils

    from megatron_tst.stop_signals import stop_signals_ignored_by_new_processes

    caller, rank = queue._get_async_caller(), dist.get_rank()
    with stop_signals_ignored_by_new_processes():
        if mcore.at_least(mcore.SHARED_CHECKPOINT_WORKER):
            caller.process = type(caller)._get_process(rank)
            return
        caller.process = mp.get_context("spawn").Process(
            target=async_utils.PersistentAsyncCaller.async_loop,
            args=(rank, caller.queue, caller.preload_q, caller.comp_q,
                  logging.getLogger(async_utils.__name__).getEffectiveLevel()))
        caller.process.start()


def start_results_queue() -> None:
    """Start the process that carries megatron's write results back (synchronous and
    background saves) with the run, deaf to the stop signals from its start
    (``stop_signals.stop_signals_ignored_by_new_processes``).
    megatron spawns it (a ``multiprocessing`` manager) at the first save otherwise: a second of
    that save's stall, and a SIGTERM sent to every process of the job (Slurm) would kill it and
    break the save the signal asks for. megatron keeps it in
    ``filesystem_async._results_queue`` (``mcore.py``)."""
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_tst.stop_signals import (ignore_stop_signals,
                                          stop_signals_ignored_by_new_processes)

    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))
        with stop_signals_ignored_by_new_processes():
            manager.start(initializer=ignore_stop_signals)
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps the manager


def remove_partial(path: Path) -> None:
    """Rank 0 removes a failed save's directory (it never had a record, so never ``latest``)."""
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
