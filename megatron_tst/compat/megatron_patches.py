"""Patches inside megatron-core modules (0.16.1 .. 0.19.x) that the torch-level layer cannot reach.

Each function imports the module it patches, so ``apply_cpu_compat()`` works whether or not
megatron-core is imported yet (megatron reads these module attributes at call time).
"""

from __future__ import annotations

import contextlib
import os
import logging
import threading
import time

import torch

from megatron_tst.stop_signals import ignore_stop_signals

from . import cuda_stubs


class _DropSameRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def patch_cuda_rng() -> None:
    """``tensor_parallel.random``: ``model_parallel_cuda_manual_seed`` and
    ``CudaRNGStatesTracker.add/fork`` read and set the CUDA RNG, which raises on the CPU build.
    Both now use the CPU default generator (the one CPU dropout draws from), so ``fork()`` really
    switches to the per-TP-rank stream. megatron's ``_set_cuda_rng_state`` defers through
    ``torch.cuda._lazy_call``, which never runs without CUDA, so it is replaced; its "CPU RNG state
    changed within GPU RNG context" warning is expected now (one generator) and filtered out."""
    from megatron.core.tensor_parallel import random as mrandom

    cuda_stubs.patch_rng()

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = get_state, set_state
    logging.getLogger(mrandom.__name__).addFilter(_DropSameRngWarning())


def patch_moe_te_general_gemm() -> None:
    """``moe_utils.router_gating_linear`` (every ``TopKRouter`` forward) references
    ``te_general_gemm``, which 0.16.1 binds only when transformer-engine imports: ``NameError``
    without it. ``None`` selects megatron's plain torch path."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def patch_moe_split_sizes() -> None:
    """``MoEAlltoAllTokenDispatcher`` turns ``input_splits``/``output_splits`` into numpy through
    ``maybe_move_tensor_to_cpu`` only ``if tensor.is_cuda``; on the CPU they stay tensors and
    ``all_to_all_single`` rejects them (EP or TP > 1). Convert CPU tensors too."""
    from megatron.core.transformer.moe import token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and tensor.device.type == "cpu":
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def patch_async_cpu_snapshot() -> None:
    """``FileSystemWriterAsync.prepare_write_data`` hands an asynchronous writer CPU tensors
    that are not views as they are (its own TODO: "for persistent worker, this work should be
    changed to move the cpu tensor to shared_memory"), and ``preload_tensors``'
    ``Tensor.to("cpu")`` returns them too: on the CPU the writer is given the live weights and
    optimizer state, and a writer that runs while training goes on writes the values of a later
    step. Inside ``SharedStaging.active()`` (a background save), each CPU tensor the planner
    resolves becomes a buffer of that staging's shared memory, filled with the tensor's values
    (one ``memcpy``: the CPU's D2H copy; megatron then has no view to clone) when the context
    ends or, deferred, by ``SharedStaging.fill``; megatron's persistent writer process receives
    the buffers without another copy. A synchronous save (no staging active) is megatron's own."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync)

    original = FileSystemWriterAsync.prepare_write_data

    def prepare_write_data(self, plan, planner):
        staging = SharedStaging.current
        if staging is None:
            return original(self, plan, planner)
        resolve = planner.resolve_data
        planner.resolve_data = staging.resolver(resolve)
        try:
            return original(self, plan, planner)
        finally:
            planner.resolve_data = resolve

    FileSystemWriterAsync.prepare_write_data = prepare_write_data


class SharedStaging:
    """Shared-memory copies of a background save's CPU tensors, reused from save to save (the
    i-th tensor of a save goes into the i-th buffer, reallocated only when its size changes). A
    fresh copy per save would cost its allocation and a page fault per 4 KiB page at every save,
    several times the copy itself; torchtitan's pinned-memory staging is reused the same way.
    One buffer per tensor, not views of one: ``torch.save`` writes a view's whole storage.
    Reuse is safe because one background save is in flight at a time (``BackgroundSaves``): the
    writer has finished with the buffers before the next save writes into them.

    ``active()`` fills the buffers when it ends. ``active(defer=True)`` leaves that to
    ``fill(background=True)``, which copies in a thread while the caller goes on (training's next
    forward and backward, which read the saved tensors but do not change them); ``join()`` waits
    for it and must come before anything changes a saved tensor, and before the buffers are
    handed to the writer."""

    current: "SharedStaging | None" = None  # the staging of the save being planned, if any

    def __init__(self):
        self.buffers: list[torch.UntypedStorage] = []
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer view, live tensor)
        self._thread: "threading.Thread | None" = None
        self._error: "BaseException | None" = None

    @contextlib.contextmanager
    def active(self, defer: bool = False):
        if self.filling:
            raise RuntimeError("the previous save's copy is still being made: join() first")
        SharedStaging.current, self._copies = self, []
        try:
            yield
        except BaseException:
            self._copies = []
            raise
        finally:
            SharedStaging.current = None
        if not defer:
            self.fill()

    @property
    def filling(self) -> bool:
        """A deferred copy is being made (``fill(background=True)`` not yet joined)."""
        return self._thread is not None

    def fill(self, background: bool = False, hold_s: float = 0.0) -> None:
        """Copy the live tensors of the last ``active(defer=True)`` into their buffers: now, or
        in a thread (``background``; ``hold_s``: after that many seconds, for tests)."""
        copies, self._copies = self._copies, []

        def run():
            try:
                time.sleep(hold_s)
                for buffer, tensor in copies:
                    buffer.copy_(tensor)  # torch releases the GIL: training's thread goes on
            except BaseException as err:  # raised again by join()
                self._error = err

        if not background:
            run()
            self._raise()
            return
        self._thread = threading.Thread(target=run, name="checkpoint-snapshot", daemon=True)
        self._thread.start()

    def join(self) -> None:
        """Wait for ``fill(background=True)``; raises what the copy raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def resolver(self, resolve):
        """``planner.resolve_data`` whose CPU tensors come back as their staged copies (filled
        when ``active`` ends, or by ``fill``)."""
        index = 0

        def staged(item):
            nonlocal index
            data = resolve(item)
            if not isinstance(data, torch.Tensor) or data.device.type != "cpu":
                return data
            data, nbytes = data.detach(), data.numel() * data.element_size()
            if index == len(self.buffers):
                self.buffers.append(torch.UntypedStorage._new_shared(nbytes))
            elif self.buffers[index].nbytes() != nbytes:
                self.buffers[index] = torch.UntypedStorage._new_shared(nbytes)
            copy = torch.empty(0, dtype=data.dtype).set_(self.buffers[index], 0, data.shape)
            index += 1
            self._copies.append((copy, data))
            return copy

        return staged


def patch_async_worker() -> None:
    """``PersistentAsyncCaller.async_loop`` runs in a spawned process, where this layer is not
    applied: it calls ``torch.cuda.set_device(rank % torch.cuda.device_count())``
    (``ZeroDivisionError`` without a GPU) and ``preload_tensors`` synchronizes CUDA. The worker
    process now applies the layer first (``cpu_async_loop``)."""
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    PersistentAsyncCaller.async_loop = staticmethod(cpu_async_loop)


# On the CPU the writer shares the cores with training: it gets them when training does not
# (a GPU job's training runs on the GPU, and megatron's writer keeps the default priority there).
WRITER_NICENESS = 10


def cpu_async_loop(*args, **kwargs):
    """megatron's persistent checkpoint worker loop, in its spawned process, under this layer,
    at a lower CPU priority than training (``WRITER_NICENESS``), deaf to the stop signals."""
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    from megatron_tst.compat import apply_cpu_compat

    loop = PersistentAsyncCaller.async_loop  # this process's own, unpatched
    apply_cpu_compat(exclude={"async_worker"})
    torch.cuda.device_count = lambda: 1  # set_device(rank % device_count()): a no-op here
    os.nice(WRITER_NICENESS)  # its forked writers inherit it
    ignore_stop_signals()  # and this, so a signal to the whole job leaves the pending save
    return loop(*args, **kwargs)
