"""Fused linear + multi-hot cross-entropy: the LM head and the MCE loss without (N, V) logits.

For final hidden states ``h`` (N, D), the LM-head weight ``W`` (V, D) (a vocab shard of it under
tensor parallelism), targets ``t`` (N, s) and element weights ``w`` (N, s) (``loss.element_weights``)
the per-position loss is::

    loss_n = W_n * logsumexp_v (h_n . W_v) - sum_k w[n,k] * (h_n . W_{t[n,k]}),   W_n = sum_k w[n,k]

(ignored slots have ``w = 0``; duplicates accumulate). ``sum_n loss_n`` is the paper's MCE (see
``docs/loss.md``); with ``s = 1`` and ``w = 1`` it is the per-token cross-entropy. Two
implementations of one algorithm (``impl``, the recipe's ``loss.implementation`` names, see
``tst/implementations.py``):

* ``"chunked"`` (PyTorch, any device): positions in chunks of ``rows`` (``CHUNK_ELEMENTS`` /
  ``V_local``); each chunk's logits are computed, reduced to (max, sum-exp, weighted target sum)
  and freed. Backward recomputes each chunk's logits and accumulates ``dh`` and ``dW``. Extra
  memory: O(rows * V) for one chunk, plus an fp32 ``dW`` accumulator for 16-bit weights.
* ``"triton"`` (``tst/kernels/triton_mce.py``): the same with vocabulary blocks streamed through
  SRAM by Triton kernels (online logsumexp), fp32 accumulation, nothing (N, V) in memory.

Vocab-parallel: rank ``r`` holds rows ``[r*V_local, (r+1)*V_local)`` of ``W``. Each rank streams
its shard to a local (max, sum-exp, target partial sum) per position; one MAX all-reduce of the max
and one SUM all-reduce of the stacked (rescaled sum-exp, target sum) combine them, exactly as
``loss.mce_vocab_parallel`` does on materialised logits (the shard bookkeeping and the
combination are ``tst/vocab_shard.py``'s, shared by both implementations). The gradient for ``h``
that comes back is this rank's partial (its shard's contribution): the caller sums it over the TP
group the way megatron's ``ColumnParallelLinear`` does (``copy_to_tensor_model_parallel_region``,
or the sequence-parallel all-gather whose backward is a reduce-scatter). ``TSTGPTModel`` does that.
"""

from __future__ import annotations

import torch

# triton_available is re-exported: callers that pick ``impl="triton"`` ask it here.
from megatron_tst.tst.implementations import LINEAR_IMPLEMENTATIONS, triton_available
from megatron_tst.tst.vocab_shard import (IGNORE_INDEX, combine_stats, compute_dtype,
                                          shard_targets, tp_group_info)

__all__ = ["LINEAR_IMPLEMENTATIONS", "linear_mce", "triton_available", "CHUNK_ELEMENTS"]

# Elements (rows * V_local) of logits per chunk. ``None``: 2^24 (64 MiB fp32) on CPU, 2^26 on GPU.
CHUNK_ELEMENTS: int | None = None
_CPU_CHUNK_ELEMENTS = 1 << 24  # 64 MiB fp32: enough rows per chunk to amortise reading W
_GPU_CHUNK_ELEMENTS = 1 << 26


def _rows(n: int, v_local: int, device: torch.device) -> int:
    budget = CHUNK_ELEMENTS
    if budget is None:
        budget = _CPU_CHUNK_ELEMENTS if device.type == "cpu" else _GPU_CHUNK_ELEMENTS
    return max(1, min(max(n, 1), budget // max(v_local, 1)))


class _ChunkedLinearMCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, ignore_index, group, rank, world_size):
        hidden, weight = hidden.detach(), weight.detach()
        n = hidden.shape[0]
        v_local = weight.shape[0]
        cdtype = compute_dtype(hidden.dtype)
        dev = hidden.device
        w, _, local_t, w_own = shard_targets(targets, weights, ignore_index, rank, v_local, cdtype)
        row_max = torch.empty(n, dtype=cdtype, device=dev)
        sum_exp = torch.empty(n, dtype=cdtype, device=dev)
        tgt = torch.empty(n, dtype=cdtype, device=dev)
        rows = _rows(n, v_local, dev)
        for i in range(0, n, rows):
            # logits in the input dtype, as the output layer computes them; softmax in >= fp32
            z = torch.matmul(hidden[i:i + rows], weight.t()).to(cdtype)
            m = z.amax(1)
            row_max[i:i + rows] = m
            z.sub_(m.unsqueeze(1))
            tgt[i:i + rows] = (z.gather(1, local_t[i:i + rows]) * w_own[i:i + rows]).sum(1) \
                + m * w_own[i:i + rows].sum(1)
            sum_exp[i:i + rows] = z.exp_().sum(1)
            del z
        loss, lse = combine_stats(row_max, sum_exp, tgt, w.sum(1), group, world_size)
        ctx.save_for_backward(hidden, weight, local_t, w, w_own, lse)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        hidden, weight, local_t, w, w_own, lse = ctx.saved_tensors
        n = hidden.shape[0]
        v_local = weight.shape[0]
        cdtype = lse.dtype
        g = grad_loss.to(cdtype).expand(n)
        row_scale = g * w.sum(1)  # d loss / d lse_n
        neg_t = -(g.unsqueeze(1) * w_own)  # d loss / d z[t] for the targets on this rank
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=cdtype if weight.dtype != cdtype else weight.dtype,
                             device=weight.device)
        rows = _rows(n, v_local, hidden.device)
        for i in range(0, n, rows):
            hc = hidden[i:i + rows]
            dz = torch.matmul(hc, weight.t()).to(cdtype)
            dz.sub_(lse[i:i + rows].unsqueeze(1)).exp_().mul_(row_scale[i:i + rows].unsqueeze(1))
            dz.scatter_add_(1, local_t[i:i + rows], neg_t[i:i + rows])
            dz = dz.to(hidden.dtype)
            torch.matmul(dz, weight, out=grad_h[i:i + rows])
            grad_w.addmm_(dz.t().to(grad_w.dtype), hc.to(grad_w.dtype))
            del dz
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None


def linear_mce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    *,
    impl: str = "chunked",
    tp_group=None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "sum",
) -> torch.Tensor:
    """``sum_n loss_n`` (``reduction="sum"``) or the per-position ``loss_n`` (``"none"``).

    ``hidden`` (N, D), ``weight`` (V_local, D) (this rank's vocab shard), ``targets`` (N, s) global
    token ids, ``weights`` (N, s) element weights (the same on every rank of ``tp_group``). The
    loss comes back in fp32 (float64 for float64 inputs); the gradients in the input dtypes.
    ``tp_group=None``: megatron's TP group when model parallelism is initialised, else no TP
    (``vocab_shard.tp_group_info``). ``impl``: ``"chunked"`` (default) or ``"triton"``.
    """
    if impl not in LINEAR_IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {LINEAR_IMPLEMENTATIONS}, got {impl!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden (N, D) and weight (V, D), got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.dim() == 1:
        targets, weights = targets.unsqueeze(1), weights.unsqueeze(1)
    if targets.shape != weights.shape or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets {tuple(targets.shape)} and weights {tuple(weights.shape)} must "
                         f"both be (N, s) with N={hidden.shape[0]}")
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    group, rank, world = tp_group_info(tp_group)
    if impl == "triton":
        from megatron_tst.tst.kernels.triton_mce import TritonLinearMCE

        fn = TritonLinearMCE
    else:
        fn = _ChunkedLinearMCE
    loss = fn.apply(hidden, weight, targets, weights, ignore_index, group, rank, world)
    return loss.sum() if reduction == "sum" else loss
