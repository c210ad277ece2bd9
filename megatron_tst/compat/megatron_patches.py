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
