"""CPU compatibility layer: run the real megatron-core on CPU with the gloo backend.

``apply_cpu_compat()`` is a no-op returning ``[]`` whenever ``torch.cuda.is_available()``: GPU runs
never change anything. On a CPU-only machine it applies every patch in ``PATCHES`` that the
installed megatron-core needs (``Patch.versions``) once and returns their names; it may be called
before or after ``import megatron.core``. Each patch's function docstring names the megatron code
it covers and why; ``docs/compat.md`` has the table and the limitations (notably: the project's own
``cuda`` requests are moved to the CPU too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from megatron_tst import mcore

from . import cuda_stubs, device, megatron_patches

__all__ = ["Patch", "PATCHES", "apply_cpu_compat", "cpu_compat_active", "cpu_model_settings"]


@dataclass(frozen=True)
class Patch:
    name: str
    covers: str  # the megatron-core code it makes work on the CPU
    why: str  # one line
    fn: Callable[[], None]  # its docstring has the details
    versions: str = ""  # the megatron-core versions that need it (PEP 440 specifier; "": all)

    def apply(self) -> None:
        self.fn()

    def needed(self) -> bool:
        """Whether the installed megatron-core needs this patch (``megatron_tst.mcore``)."""
        return mcore.matches(self.versions)


PATCHES: dict[str, Patch] = {p.name: p for p in (
    Patch("cuda_device_to_cpu",
          "device='cuda' / device=torch.cuda.current_device() / Tensor.cuda() in "
          "distributed.param_and_grad_buffer, pipeline_parallel.schedules and p2p_communication, "
          "utils.GlobalMemoryBuffer, tensor_parallel.mappings, RoPE inv_freq, MoE",
          "megatron allocates on CUDA unconditionally; a TorchFunctionMode maps that to cpu",
          device.map_cuda_devices),
    Patch("cuda_device_in_backward",
          "backward of megatron's autograd Functions: tensor_parallel.layers."
          "LinearWithGradAccumulationAndAsyncCommunication (SP), tensor_parallel.mappings (MoE)",
          "torch runs custom backward with the mode stashed, and they allocate on CUDA too",
          device.run_backward_under_mode),
    Patch("cuda_tensor_type_names",
          "optimizer.Float16OptimizerWithFloat16Params, optimizer.DistributedOptimizer, "
          "optimizer.clip_grads.clip_grad_by_total_norm_fp32",
          "they accept only Tensor.type() == 'torch.cuda.*Tensor'; CPU tensors report that name",
          device.report_cuda_type_names),
    Patch("cuda_streams_events",
          "torch.cuda.Stream/Event/stream/current_stream/synchronize, Tensor.record_stream in "
          "moe.token_dispatcher, DDP, p2p_communication, dist_checkpointing (synchronous and "
          "asynchronous saves: filesystem_async.preload_tensors, async_utils.TemporalAsyncCaller)",
          "they raise on the CPU build; everything is synchronous on the CPU, so no-ops are exact",
          cuda_stubs.patch_streams_events),
    Patch("cuda_current_device",
          "torch.cuda.current_device/set_device in GlobalMemoryBuffer, p2p, mappings, DDP, "
          "dist_checkpointing's async completion checks (async_utils.AsyncCallsQueue)",
          "raises on the CPU build; returns 0, which cuda_device_to_cpu maps to cpu",
          cuda_stubs.patch_current_device),
    Patch("cuda_rng",
          "tensor_parallel.random: model_parallel_cuda_manual_seed, CudaRNGStatesTracker "
          "add/fork, activation-recompute RNG state",
          "the CUDA generator becomes the CPU default generator, so fork() switches dropout RNG",
          megatron_patches.patch_cuda_rng),
    Patch("moe_te_general_gemm",
          "transformer.moe.moe_utils.router_gating_linear (TopKRouter forward)",
          "NameError: te_general_gemm without transformer-engine; None picks the torch path",
          megatron_patches.patch_moe_te_general_gemm, versions="<0.19"),
    Patch("async_cpu_snapshot",
          "dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync."
          "prepare_write_data (asynchronous saves)",
          "CPU tensors reach the async writer uncopied: it would write the live, later state",
          megatron_patches.patch_async_cpu_snapshot),
    Patch("async_worker",
          "dist_checkpointing.strategies.async_utils.PersistentAsyncCaller.async_loop (the "
          "persistent checkpoint writer process)",
          "the spawned writer has no layer: set_device(rank % device_count()) divides by zero",
          megatron_patches.patch_async_worker),
    Patch("moe_split_sizes",
          "transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher (maybe_move_tensor_to_cpu)",
          "split sizes become numpy only for CUDA tensors; all_to_all_single needs numbers",
          megatron_patches.patch_moe_split_sizes),
)}

_applied: list[str] = []


def cpu_compat_active() -> bool:
    """True once ``apply_cpu_compat`` has applied at least one patch in this process."""
    return bool(_applied)


def apply_cpu_compat(exclude: Iterable[str] = ()) -> list[str]:
    """Apply every needed patch not in ``exclude`` (once per process) when CUDA is absent.

    Returns the names of all patches now active in this process, in ``PATCHES`` order, or ``[]``
    when ``torch.cuda.is_available()`` (then nothing is touched). Patches cannot be undone.
    """
    if torch.cuda.is_available():
        return []
    exclude = set(exclude)
    if exclude - PATCHES.keys():
        raise KeyError(f"unknown compat patches {sorted(exclude - PATCHES.keys())}")
    for name, patch in PATCHES.items():
        if name not in exclude and name not in _applied and patch.needed():
            patch.apply()
            _applied.append(name)
    return [name for name in PATCHES if name in _applied]


def cpu_model_settings() -> dict:
    """``TransformerConfig`` fields a run without CUDA sets (the GPU path keeps megatron's
    defaults, ``False`` and ``True``): weights are initialised on the CPU, and pipeline sends and
    receives are not batched. gloo runs batched p2p ops as independent ops matched in posting
    order; with 2 stages the previous and next rank are the same, and the interleaved schedule's
    forward and backward messages then cross. Unbatched p2p orders them."""
    return {"use_cpu_initialization": True, "batch_p2p_comm": False}
