"""What the compat tests run: shared by conftest.py (which starts every run at once) and the tests."""

from __future__ import annotations

# One process, all patches: everything a single-rank training job touches.
ALL_PROBES = ["idempotent", "train_step", "rng_tracker", "moe_train_step", "dist_checkpoint",
              "async_dist_checkpoint", "persistent_async_dist_checkpoint"]

# Two gloo ranks, all patches, megatron imported before the layer is applied.
TWO_RANK_PROBES = [
    "train_step",  # DP=2: megatron DDP + distributed optimizer + get_forward_backward_func
    "tp2_train_step",  # TP=2 forward/backward + optimizer
    "tp2_sp_train_step",  # TP=2 + sequence parallelism
    "pp2_train_step",  # PP=2 1F1B over gloo p2p
    "moe_train_step",  # EP=2, alltoall dispatcher
    "moe_allgather_train_step",  # EP=2, allgather dispatcher
]

# What torch raises for a CUDA call without a GPU: the CPU build (Python 3.11 here) says it was not
# compiled with CUDA, the CUDA build (Python 3.12) that it found no driver.
NO_CUDA = r"not compiled with CUDA|Found no NVIDIA driver"

# patch -> (ranks, probes that must fail without it, error pattern, pattern of a "file:function"
# frame in the traceback)
# The same probes pass with every patch applied (ALL_PROBES / TWO_RANK_PROBES above).
NEEDED = {
    "cuda_device_to_cpu": (
        1, ["train_step"], rf"accelerator|CUDA|{NO_CUDA}",
        "distributed/param_and_grad_buffer.py:__init__"),
    "cuda_device_in_backward": (
        2, ["tp2_sp_train_step", "moe_train_step"], rf"accelerator|CUDA|{NO_CUDA}",
        r"megatron/core/tensor_parallel/\w+\.py:backward$"),
    "cuda_tensor_type_names": (
        1, ["train_step"], r"must be one of torch\.cuda\.FloatTensor",
        r"distrib_optimizer\.py:_build_model_and_main_param_groups"),
    "cuda_streams_events": (
        1, ["moe_train_step", "dist_checkpoint", "async_dist_checkpoint"], rf"CUDA|{NO_CUDA}",
        r"token_dispatcher\.py:__init__|filesystem_async\.py:preload_tensors"
        r"|param_and_grad_buffer\.py:start_grad_sync"),  # 0.19: DDP grad sync
    "cuda_current_device": (
        1, ["train_step"], NO_CUDA, "torch/cuda/__init__.py:current_device"),
    "cuda_rng": (
        1, ["rng_tracker"], NO_CUDA,
        "tensor_parallel/random.py:model_parallel_cuda_manual_seed"),
    "moe_te_general_gemm": (
        1, ["moe_train_step"], r"NameError: name 'te_general_gemm' is not defined", "moe_utils.py"),
    "async_cpu_snapshot": (
        1, ["persistent_async_dist_checkpoint"], r"the checkpoint holds the weights of after",
        r"_workloads\.py:_save_twice"),
    "async_worker": (
        1, ["persistent_async_dist_checkpoint"], r"writer process exited with 1",
        r"_workloads\.py:probe_persistent_async_dist_checkpoint"),
    "moe_split_sizes": (
        2, ["moe_train_step"], r"all_to_all_single\(\): incompatible function arguments",
        "token_dispatcher.py:token_dispatch"),
}
