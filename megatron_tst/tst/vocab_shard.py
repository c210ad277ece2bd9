"""The vocabulary shard of a tensor-parallel rank, as the multi-hot cross-entropy losses see it.

Under tensor parallelism rank ``r`` of a group of ``world_size`` holds the vocabulary columns
(logits) or rows (LM-head weight) ``[r*V_local, (r+1)*V_local)``. Every MCE implementation that
runs on such a shard (``loss.mce_vocab_parallel`` on materialised logits, ``linear_loss``'s
chunked PyTorch path and the Triton kernels of ``kernels/triton_mce.py``) needs the same few
things, kept here once:

* ``IGNORE_INDEX``: the target id of an ignored slot.
* ``compute_dtype``: the dtype the softmax statistics are computed in (at least float32).
* ``tp_group_info``: the TP group to use (megatron's by default), this rank and the group size.
* ``shard_targets``: which target slots this rank owns, their local ids, and the element weights
  of all slots and of the owned ones.
* ``combine_stats``: the per-position loss from each rank's (max, sum-exp, weighted target sum):
  one MAX and one SUM all-reduce.

Depends on torch only (megatron-core's ``parallel_state`` when the default TP group is asked for).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

__all__ = ["IGNORE_INDEX", "TargetShard", "compute_dtype", "tp_group_info", "shard_targets",
           "combine_stats"]

IGNORE_INDEX = -100


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: 16-bit logits are computed in fp32, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def tp_group_info(tp_group=None):
    """``(group, rank, world_size)`` of the tensor-parallel group the loss runs over.

    ``tp_group=None``: megatron's tensor-model-parallel group when torch.distributed and megatron's
    model parallelism are initialised, else no tensor parallelism: ``(None, 0, 1)``.
    """
    if tp_group is None:
        if not dist.is_available() or not dist.is_initialized():
            return None, 0, 1
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return None, 0, 1
        tp_group = parallel_state.get_tensor_model_parallel_group()
    return tp_group, dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


class TargetShard(NamedTuple):
    """The targets ``(N, s)`` as rank ``rank`` of the vocabulary split sees them."""

    w: torch.Tensor  # (N, s) element weights in the compute dtype, 0 on ignored slots
    own: torch.Tensor  # (N, s) bool: slot not ignored and its token in this rank's shard
    local_t: torch.Tensor  # (N, s) token id - shard start where owned, else the fill value
    w_own: torch.Tensor  # (N, s) w where owned, else 0


def shard_targets(
    targets: torch.Tensor,
    weights: torch.Tensor,
    ignore_index: int,
    rank: int,
    v_local: int,
    cdtype: torch.dtype,
    *,
    fill: int = 0,
    id_dtype: torch.dtype = torch.int64,
) -> TargetShard:
    """The slots of ``targets`` that rank ``rank`` owns: ids in ``[rank, rank+1) * v_local``.

    ``weights`` are the element weights (``loss.element_weights``), cast to ``cdtype``. The local
    ids of slots not owned are ``fill``: 0 (a valid column, for ``gather`` / ``scatter_add`` whose
    contribution is masked or weighted by 0) or -1 (matches no column, for the Triton kernels);
    ``id_dtype`` int64 for torch's indexing ops, int32 for the kernels.
    """
    start = rank * v_local
    zero = torch.zeros((), dtype=cdtype, device=weights.device)
    valid = targets != ignore_index
    w = torch.where(valid, weights.to(cdtype), zero)
    own = valid & (targets >= start) & (targets < start + v_local)
    local_t = torch.where(own, targets - start, torch.full_like(targets, fill)).to(id_dtype)
    return TargetShard(w, own, local_t, torch.where(own, w, zero))


def combine_stats(row_max, sum_exp, tgt, w_row, group, world_size):
    """Per-position loss from this rank's (max, sum-exp at that max, weighted target sum).

    One MAX all-reduce, one SUM all-reduce of the stacked (rescaled sum-exp, target sum).
    Returns ``(loss_n, lse_n)``.
    """
    if world_size > 1:
        gmax = row_max.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        stats = torch.stack([sum_exp * torch.exp(row_max - gmax), tgt])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        row_max, sum_exp, tgt = gmax, stats[0], stats[1]
    lse = row_max + sum_exp.log()
    return w_row * lse - tgt, lse
