"""Patches inside megatron-core modules (0.16.1 .. 0.19.x) that the torch-level layer cannot reach.

Each function imports the module it patches, so ``apply_cpu_compat()`` works whether or not
megatron-core is imported yet (megatron reads these module attributes at call time).
"""

from __future__ import annotations

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
    """``FileSystemWriterAsync.prepare_write_data`` hands an asynchronous writer CPU tensors that
    are not views as they are (its own TODO: "for persistent worker, this work should be changed
    to move the cpu tensor to shared_memory"), and ``preload_tensors``' ``Tensor.to("cpu")``
    returns them too: on the CPU the writer is given the live weights and optimizer state, and
    a writer that runs while training goes on writes the values of a later step. Each CPU tensor
    of the write buckets becomes a copy in shared memory (one ``memcpy``: the CPU's D2H copy),
    which megatron's persistent writer process receives without another copy."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import (
        FileSystemWriterAsync)

    original = FileSystemWriterAsync.prepare_write_data

    def prepare_write_data(self, plan, planner):
        original(self, plan, planner)
        self.write_buckets = [
            (path, key, (data, [(item, _shared_copy(t)) for item, t in tensors]))
            for path, key, (data, tensors) in self.write_buckets]

    FileSystemWriterAsync.prepare_write_data = prepare_write_data


def _shared_copy(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type != "cpu":
        return tensor
    storage = torch.UntypedStorage._new_shared(tensor.numel() * tensor.element_size())
    return torch.empty(0, dtype=tensor.dtype).set_(storage, 0, tensor.shape).copy_(tensor)


def patch_async_worker() -> None:
    """``PersistentAsyncCaller.async_loop`` runs in a spawned process, where this layer is not
    applied: it calls ``torch.cuda.set_device(rank % torch.cuda.device_count())``
    (``ZeroDivisionError`` without a GPU) and ``preload_tensors`` synchronizes CUDA. The worker
    process now applies the layer first (``cpu_async_loop``)."""
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    PersistentAsyncCaller.async_loop = staticmethod(cpu_async_loop)


def cpu_async_loop(*args, **kwargs):
    """megatron's persistent checkpoint worker loop, in its spawned process, under this layer."""
    from megatron.core.dist_checkpointing.strategies.async_utils import PersistentAsyncCaller

    from megatron_tst.compat import apply_cpu_compat

    loop = PersistentAsyncCaller.async_loop  # this process's own, unpatched
    apply_cpu_compat(exclude={"async_worker"})
    torch.cuda.device_count = lambda: 1  # set_device(rank % device_count()): a no-op here
    return loop(*args, **kwargs)
