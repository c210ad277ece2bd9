"""Patches inside megatron-core modules (0.16.1 .. 0.19.x) that the torch-level layer cannot reach.

Each function imports the module it patches, so ``apply_cpu_compat()`` works whether or not
megatron-core is imported yet (megatron reads these module attributes at call time).
"""

from __future__ import annotations

import contextlib
import os
import signal
import logging

import torch

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
    resolves is copied into that staging's shared memory (one ``memcpy``: the CPU's D2H copy;
    megatron then has no view to clone), which megatron's persistent writer process receives
    without another copy. A synchronous save (no staging active) is megatron's own."""
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
    writer has finished with the buffers before the next save writes into them."""

    current: "SharedStaging | None" = None  # the staging of the save being planned, if any

    def __init__(self):
        self.buffers: list[torch.UntypedStorage] = []

    @contextlib.contextmanager
    def active(self):
        SharedStaging.current = self
        try:
            yield
        finally:
            SharedStaging.current = None

    def resolver(self, resolve):
        """``planner.resolve_data`` whose CPU tensors come back as their staged copies."""
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
            return copy.copy_(data)

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


# What schedulers and launchers send to stop a job (Slurm signals every process of a job step).
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")


def ignore_stop_signals() -> None:
    """In a process megatron's checkpoint writer spawns (the persistent writer; the process
    that carries write results back, on GPUs too): ignore ``STOP_SIGNALS``. Spawned, it keeps
    neither the trainer's handlers nor its block of the exit signals, so a signal to every
    process of the job would kill it and break the save the trainer finishes before it exits.
    These processes end as megatron ends them (a message, or SIGKILL after a failure)."""
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)

