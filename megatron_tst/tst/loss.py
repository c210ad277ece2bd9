"""Multi-hot cross-entropy (MCE) for the superposition phase of Token-Superposition Training.

Latent position ``n`` has ``s`` target slots ``targets[n, k]`` (token ids; ``ignore_index`` marks an
ignored slot) and slot weights ``c_k`` (uniform ``1/s``, a power law, or explicit; they sum to 1).
The paper's loss is the weighted sum of ``s`` ordinary cross-entropies on the same logits, each
averaged over its own non-ignored positions::

    loss = sum_k c_k * [ sum_n m[n,k] * CE(z_n, t[n,k]) / sum_n m[n,k] ],   m = (t != ignore_index)
    CE(z, t) = logsumexp(z) - z[t]

which equals ``sum_n sum_k w[n,k] * (lse_n - z_n[t[n,k]])`` with the element weights
``w[n,k] = c_k * m[n,k] / max(1, sum_n m[n,k])`` (``element_weights``). A token that occurs twice
in a bag is counted twice; a slot with no non-ignored position contributes 0.

Three kernels behind one interface (``multi_hot_cross_entropy``, whose ``impl`` names are the
recipe's ``loss.implementation``, see ``tst/implementations.py``):

* ``mce_reference``   -- ``s`` calls of ``F.cross_entropy`` (the paper's formulation; for tests).
  ``impl="reference"``.
* ``mce_fused``       -- one autograd Function: one log-softmax pass per position (not per slot),
  gathers the ``s`` target log-probabilities, and a backward that writes the gradient once.
* ``mce_vocab_parallel`` -- logits sharded over the vocabulary on the tensor-parallel ranks:
  one MAX all-reduce and one fused SUM all-reduce in forward, no communication in backward.
  On a group of one rank (or with no tensor parallelism) it is ``mce_fused``. ``impl="fused"``.

The vocab-shard bookkeeping (owned target slots, default TP group, compute dtype) is shared with
the fused-linear losses in ``tst/vocab_shard.py``.

See ``docs/loss.md`` for the numerics (what is bitwise equal to ``F.cross_entropy`` and what holds
to a tolerance), memory and the communication pattern.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_tst.tst.implementations import LOGITS_IMPLEMENTATIONS
from megatron_tst.tst.vocab_shard import IGNORE_INDEX, compute_dtype, shard_targets, tp_group_info

__all__ = [
    "IGNORE_INDEX",
    "WEIGHTINGS",
    "slot_weights",
    "element_weights",
    "mce_reference",
    "mce_fused",
    "mce_vocab_parallel",
    "multi_hot_cross_entropy",
]

WEIGHTINGS = ("uniform", "power_law", "explicit")

# Elements (rows * vocab) processed per chunk by the fused / vocab-parallel kernels. ``None`` picks
# a per-device default (``_chunk_rows``); tests set a small value to exercise chunk boundaries.
CHUNK_ELEMENTS: int | None = None
_CPU_CHUNK_ELEMENTS = 1 << 21  # 8 MiB of fp32: cache-resident, and few parallel regions
_GPU_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of fp32: few launches, bounded transient memory

# Private ATen ops (stable since torch 1.11): the very kernels F.cross_entropy runs, so that the
# forward values and the s=1 gradients match it bit for bit, with ``out=`` to avoid temporaries.
_log_softmax_out = torch.ops.aten._log_softmax.out
_log_softmax_backward_out = torch.ops.aten._log_softmax_backward_data.out


# ----------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------
def slot_weights(
    bag_size: int,
    weighting: str = "uniform",
    power: float = 1.0,
    explicit: Sequence[float] | None = None,
) -> torch.Tensor:
    """Per-slot weights ``c_k`` as a float32 tensor of shape ``(bag_size,)`` summing to 1.

    ``"uniform"``: ``1/s`` each (the paper's MCE). ``"power_law"``: ``c_k ∝ 1/(k+1)**power``
    (slot 0 is the token right after the current bag; the paper's ``1/i`` is ``power=1``).
    ``"explicit"``: ``explicit`` normalised to sum 1 (non-negative, not all zero, length ``s``).
    """
    if isinstance(bag_size, bool) or not isinstance(bag_size, int) or bag_size < 1:
        raise ValueError(f"bag_size must be an integer >= 1, got {bag_size!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if explicit is not None and weighting != "explicit":
        raise ValueError(f"explicit slot weights given but weighting={weighting!r}; "
                         "pass weighting='explicit' to use them")
    if weighting == "uniform":
        w = torch.ones(bag_size, dtype=torch.float64)
    elif weighting == "power_law":
        if (isinstance(power, bool) or not isinstance(power, (int, float))
                or not math.isfinite(power)):
            raise ValueError(f"power must be a finite number, got {power!r}")
        w = torch.arange(1, bag_size + 1, dtype=torch.float64).pow(-float(power))
    else:
        if explicit is None:
            raise ValueError("weighting='explicit' needs explicit=[c_0, ..., c_{s-1}]")
        try:
            w = torch.as_tensor([float(x) for x in explicit], dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"explicit slot weights must be numbers, got {explicit!r}") from exc
        if w.numel() != bag_size:
            raise ValueError(f"explicit slot weights have length {w.numel()}, "
                             f"expected bag_size={bag_size}")
        if not torch.isfinite(w).all():
            raise ValueError(f"explicit slot weights must be finite, got {list(explicit)}")
        if (w < 0).any():
            raise ValueError(f"explicit slot weights must be non-negative, got {list(explicit)}")
        if w.sum() <= 0:
            raise ValueError("explicit slot weights are all zero; at least one must be positive")
    return (w / w.sum()).to(torch.float32)


def element_weights(
    targets: torch.Tensor,
    slot_w: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``w[n,k] = c_k * m[n,k] / max(1, sum_n m[n,k])``, float32, shape of ``targets`` ``(N, s)``.

    ``m = targets != ignore_index``; ignored elements get weight 0. Summing the per-element
    cross-entropies times these weights gives the paper's loss (each slot averaged over its own
    non-ignored positions). ``targets`` may be ``(..., s)``: the average runs over all leading dims.
    ``dtype`` (keyword, default float32): ``multi_hot_cross_entropy`` passes float64 for float64
    logits so that the weights do not limit a float64 loss to float32 accuracy.
    """
    if targets.dim() < 1:
        raise ValueError("targets must have a trailing slot dimension (..., s)")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
    s = targets.shape[-1]
    slot_w = torch.as_tensor(slot_w)
    if slot_w.dim() != 1 or slot_w.numel() != s:
        raise ValueError(f"slot weights have shape {tuple(slot_w.shape)}, expected ({s},) for "
                         f"targets of shape {tuple(targets.shape)}")
    valid = (targets != ignore_index).reshape(-1, s)
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    count = valid.sum(0).clamp_min(1).to(dtype)
    per_slot = slot_w.to(device=targets.device, dtype=dtype) / count  # fl(c_k / count_k)
    return (valid.to(dtype) * per_slot).reshape(targets.shape)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    if CHUNK_ELEMENTS is not None:
        budget, floor = CHUNK_ELEMENTS, 1
    elif device.type == "cpu":
        # torch's CPU softmax kernels parallelise over rows only: keep >= 1 row per thread.
        floor = torch.get_num_threads()
        budget = _CPU_CHUNK_ELEMENTS
    else:
        budget, floor = _GPU_CHUNK_ELEMENTS, 1
    return max(1, min(max(n_rows, 1), max(floor, budget // max(vocab, 1))))


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    if targets.dim() != 2 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets must be (N, s) with N={logits.shape[0]}, "
                         f"got shape {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor of token ids, got {targets.dtype}")
    if weights.shape != targets.shape:
        raise ValueError(f"weights must have the shape of targets {tuple(targets.shape)}, "
                         f"got {tuple(weights.shape)}")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be floating point, got {weights.dtype}")


def _mean_columns(weights: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot: its non-ignored count, and whether its weights are exactly ``float(1/count)``.

    Such a slot (s=1 with the default weights, or any slot with c_k = 1) is a plain mean: the
    forward reduces it with ``F.nll_loss(reduction="mean")`` (the summation order and the final
    division of ``F.cross_entropy``) and the backward uses ``grad / count``, as torch does. Both
    forms are the same number up to rounding; this choice makes s=1 bitwise ``F.cross_entropy``.
    Computed with tensor ops only (no host synchronisation).
    """
    count = valid.sum(0)
    if weights.shape[0] == 0:
        return count, torch.zeros_like(count, dtype=torch.bool)
    inv = torch.ones((), dtype=weights.dtype, device=weights.device) / count.to(weights.dtype)
    hi = torch.where(valid, weights, torch.full_like(weights, -math.inf)).amax(0)
    lo = torch.where(valid, weights, torch.full_like(weights, math.inf)).amin(0)
    is_mean = (count > 0) & (hi == lo) & (hi == inv)
    return count, is_mean


# ----------------------------------------------------------------------------------------------
# (a) reference
# ----------------------------------------------------------------------------------------------
def mce_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    slot_w: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """``sum_k c_k * F.cross_entropy(logits, targets[:, k], reduction="mean")`` in >= fp32.

    Slots whose targets are all ignored are skipped (contribute 0; ``F.cross_entropy`` would give
    NaN). Keeps ``s`` log-softmax outputs of size (N, V) alive for backward: for tests only.
    """
    if targets.dim() != 2 or logits.dim() != 2 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"need logits (N, V) and targets (N, s), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    z = logits.to(compute_dtype(logits.dtype))
    slot_w = torch.as_tensor(slot_w).to(device=z.device, dtype=z.dtype)
    if slot_w.numel() != targets.shape[1]:
        raise ValueError(f"{slot_w.numel()} slot weights for {targets.shape[1]} target slots")
    loss = z.sum() * 0.0  # a zero in the graph, so backward works when every slot is ignored
    for k in range(targets.shape[1]):
        t = targets[:, k]
        if bool((t != ignore_index).any()):
            loss = loss + slot_w[k] * F.cross_entropy(z, t, ignore_index=ignore_index)
    return loss


# ----------------------------------------------------------------------------------------------
# (b) fused
# ----------------------------------------------------------------------------------------------
class _FusedMCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, weights, ignore_index):
        logits = logits.detach().contiguous()
        n, vocab = logits.shape
        s = targets.shape[1]
        cdtype = compute_dtype(logits.dtype)
        dev = logits.device

        valid = targets != ignore_index
        safe_t = torch.where(valid, targets, torch.zeros_like(targets)).to(torch.int64)
        w = torch.where(valid, weights.to(cdtype), torch.zeros((), dtype=cdtype, device=dev))
        count, is_mean = _mean_columns(weights, valid)

        row_max = torch.empty(n, dtype=cdtype, device=dev)  # max_n z
        log_sum = torch.empty(n, dtype=cdtype, device=dev)  # log sum_v exp(z_v - max_n)
        tgt_lp = torch.empty(n, s, dtype=cdtype, device=dev)  # log p_n(t[n,k])
        rows = _chunk_rows(n, vocab, dev)
        buf = torch.empty(min(rows, n), vocab, dtype=cdtype, device=dev)
        for i in range(0, n, rows):
            zc = logits[i:i + rows]
            lsm = buf[: zc.shape[0]]
            if logits.dtype == cdtype:
                _log_softmax_out(zc, -1, False, out=lsm)
            else:  # = log_softmax(zc.float()), the same kernel on the same fp32 values
                lsm.copy_(zc)
                _log_softmax_out(lsm, -1, False, out=lsm)
            row_max[i:i + rows] = zc.amax(-1)
            # The kernel computes lsm = (z - max) - log_sum, which is -log_sum exactly at the argmax
            # and (rounding being monotone) no larger anywhere else: max(lsm) = -log_sum exactly.
            log_sum[i:i + rows] = lsm.amax(-1).neg()
            tgt_lp[i:i + rows] = lsm.gather(1, safe_t[i:i + rows])
        del buf

        # Reduction: slots that are plain means go through nll_loss exactly as F.cross_entropy;
        # any other slot is the weighted sum sum_n w[n,k] * (-log p). Tensor ops only (no sync).
        general = (w * tgt_lp).sum(0).neg()
        per_slot = []
        for k in range(s):
            tk = torch.where(valid[:, k], torch.zeros_like(safe_t[:, k]),
                             torch.full_like(safe_t[:, k], -1))
            mean_k = F.nll_loss(tgt_lp[:, k:k + 1], tk, ignore_index=-1)
            per_slot.append(torch.where(is_mean[k], mean_k, general[k]))
        loss = torch.stack(per_slot).sum() if s > 0 else logits.new_zeros((), dtype=cdtype)

        ctx.save_for_backward(logits, safe_t, valid, w, count, is_mean, row_max, log_sum)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, safe_t, valid, w, count, is_mean, row_max, log_sum = ctx.saved_tensors
        n, vocab = logits.shape
        cdtype = row_max.dtype
        dev = logits.device
        g = grad_out.to(cdtype)
        # wg[n,k] = d loss / d CE[n,k]: g/count for mean slots (as torch does), else g*w[n,k].
        mean_w = torch.where(valid, (g / count.clamp_min(1).to(cdtype)).expand_as(w),
                             torch.zeros((), dtype=cdtype, device=dev))
        neg_wg = torch.where(is_mean.unsqueeze(0), mean_w, g * w).neg()

        grad = torch.empty_like(logits)
        rows = _chunk_rows(n, vocab, dev)
        m = min(rows, n)
        go_buf = torch.zeros(m, vocab, dtype=cdtype, device=dev)  # kept zero between chunks
        lsm_buf = (None if logits.dtype == cdtype
                   else torch.empty(m, vocab, dtype=cdtype, device=dev))
        for i in range(0, n, rows):
            zc = logits[i:i + rows]
            r = zc.shape[0]
            idx = safe_t[i:i + rows]
            # Recompute log-softmax bit for bit, (z - max) - log_sum as the forward kernel did,
            # straight into the gradient rows (fp32) or a chunk buffer (16-bit logits).
            lsm = grad[i:i + rows] if lsm_buf is None else lsm_buf[:r]
            torch.sub(zc, row_max[i:i + rows].unsqueeze(1), out=lsm)
            lsm.sub_(log_sum[i:i + rows].unsqueeze(1))
            go = go_buf[:r]
            go.scatter_add_(1, idx, neg_wg[i:i + rows])  # d loss / d log p; duplicates accumulate
            # grad = go - softmax * sum_v(go) = g * (W_n * softmax - scatter(w)): torch's own
            # log-softmax backward kernel (elementwise, so it may write over its `output` input).
            _log_softmax_backward_out(go, lsm, -1, cdtype, out=lsm)
            go.scatter_(1, idx, 0.0)  # back to zeros: no full pass
            if lsm_buf is not None:
                grad[i:i + rows].copy_(lsm)
        return grad, None, None, None


def mce_fused(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Fused MCE: ``sum_n sum_k w[n,k] * (lse_n - z_n[t[n,k]])`` for logits ``(N, V)``.

    ``logits`` may be any float dtype (16-bit ones are computed in fp32, float64 in float64),
    ``targets`` ``(N, s)`` integer, ``weights`` ``(N, s)`` float (``element_weights``). One
    log-softmax pass per position (chunked over rows: only chunk-sized temporaries),
    backward writes ``g * (W_n * softmax(z_n) - scatter_add(w[n,k] at t[n,k]))`` in the logits
    dtype, recomputing the softmax from the saved row max and log-sum (nothing of size (N, V) is
    saved besides the logits themselves). The loss is returned in the compute dtype.
    """
    _check_inputs(logits, targets, weights)
    return _FusedMCE.apply(logits, targets, weights, ignore_index)


# ----------------------------------------------------------------------------------------------
# (c) vocab-parallel
# ----------------------------------------------------------------------------------------------
class _VocabParallelMCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, weights, ignore_index, group, rank, world_size):
        logits = logits.detach().contiguous()
        n, vocab_local = logits.shape
        cdtype = compute_dtype(logits.dtype)
        dev = logits.device
        # columns [rank*V_local, (rank+1)*V_local): the target slots this rank owns
        w, own, local_t, _ = shard_targets(targets, weights, ignore_index, rank, vocab_local,
                                           cdtype)

        # 1) global row max: one MAX all-reduce.
        row_max = logits.amax(-1).to(cdtype)
        if world_size > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)

        # 2) local sum of exp(z - max) and local weighted target logits (shifted by the max).
        stats = torch.zeros(2, n, dtype=cdtype, device=dev)
        rows = _chunk_rows(n, vocab_local, dev)
        buf = torch.empty(min(rows, n), vocab_local, dtype=cdtype, device=dev)
        for i in range(0, n, rows):
            zc = logits[i:i + rows]
            e = buf[: zc.shape[0]]
            torch.sub(zc, row_max[i:i + rows].unsqueeze(1), out=e)
            e.exp_()
            torch.sum(e, dim=-1, out=stats[0, i:i + rows])
        del buf
        z_t = logits.gather(1, local_t).to(cdtype) - row_max.unsqueeze(1)
        stats[1] = torch.where(own, w * z_t, torch.zeros((), dtype=cdtype, device=dev)).sum(1)

        # 3) one fused SUM all-reduce of (sum-exp, weighted target-logit sum).
        if world_size > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=group)
        log_sum = stats[0].log()
        loss = (w.sum(1) * log_sum - stats[1]).sum()

        ctx.save_for_backward(logits, local_t, own, w, row_max, log_sum)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        logits, local_t, own, w, row_max, log_sum = ctx.saved_tensors
        n, vocab_local = logits.shape
        cdtype = row_max.dtype
        dev = logits.device
        wg = grad_out.to(cdtype) * w
        row_w = wg.sum(1)  # W_n * g over all slots: the softmax is the global one
        neg_local = torch.where(own, wg, torch.zeros((), dtype=cdtype, device=dev)).neg()

        grad = torch.empty_like(logits)
        rows = _chunk_rows(n, vocab_local, dev)
        buf = (None if logits.dtype == cdtype
               else torch.empty(min(rows, n), vocab_local, dtype=cdtype, device=dev))
        for i in range(0, n, rows):
            zc = logits[i:i + rows]
            out = grad[i:i + rows] if buf is None else buf[: zc.shape[0]]
            torch.sub(zc, row_max[i:i + rows].unsqueeze(1), out=out)
            out.sub_(log_sum[i:i + rows].unsqueeze(1)).exp_().mul_(row_w[i:i + rows].unsqueeze(1))
            out.scatter_add_(1, local_t[i:i + rows], neg_local[i:i + rows])
            if buf is not None:
                grad[i:i + rows].copy_(out)
        return grad, None, None, None, None, None, None


def mce_vocab_parallel(
    logits_local: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    tp_group=None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """MCE on vocab-parallel logits: rank r holds columns ``[r*V_local, (r+1)*V_local)``.

    ``targets`` and ``weights`` hold global token ids / weights and must be the same on every rank
    of ``tp_group`` (default: megatron's tensor-model-parallel group when model parallelism is
    initialised, else none: ``vocab_shard.tp_group_info``). Forward: one MAX all-reduce of the
    per-position max, one SUM all-reduce of the stacked (sum-exp, weighted target-logit sum); the
    returned loss is the same on every rank. Backward: the local shard of ``mce_fused``'s
    gradient, no communication. With a group of size 1 (or none) this *is* ``mce_fused``.
    """
    _check_inputs(logits_local, targets, weights)
    group, rank, world_size = tp_group_info(tp_group)
    if world_size == 1:
        return mce_fused(logits_local, targets, weights, ignore_index)
    return _VocabParallelMCE.apply(logits_local, targets, weights, ignore_index, group, rank,
                                   world_size)


# ----------------------------------------------------------------------------------------------
# the one interface
# ----------------------------------------------------------------------------------------------
def multi_hot_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    slot_w: torch.Tensor,
    *,
    impl: str = "fused",
    tp_group=None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The paper's MCE loss (a scalar) for logits ``(..., V)`` and target bags ``(..., s)``.

    The leading dims of ``logits`` and ``targets`` must match (any layout, e.g. megatron's
    ``(L, B, V)`` with ``(L, B, s)``); a ``targets`` of shape ``logits.shape[:-1]`` is one slot.
    Each slot is averaged over its non-ignored positions across all leading dims, then the slots
    are combined with ``slot_w`` (``slot_weights``). ``impl`` (``tst/implementations.py``):
    ``"fused"`` (default; ``mce_vocab_parallel``: ``logits`` is this rank's vocab shard when
    ``tp_group``, or by default megatron's tensor-parallel group, has more than one rank, and the
    full logits through ``mce_fused`` otherwise) or ``"reference"`` (``s`` cross-entropy calls,
    full logits).
    """
    if impl not in LOGITS_IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {LOGITS_IMPLEMENTATIONS}, got {impl!r}")
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension (..., V)")
    if tuple(targets.shape) == tuple(logits.shape[:-1]):
        targets = targets.unsqueeze(-1)
    if targets.dim() != logits.dim() or targets.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be (..., s) with the leading dims "
                         f"of logits {tuple(logits.shape)}")
    s = targets.shape[-1]
    z = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1, s)
    if impl == "reference":
        return mce_reference(z, t, slot_w, ignore_index)
    w = element_weights(t, slot_w, ignore_index, dtype=compute_dtype(z.dtype))
    return mce_vocab_parallel(z, t, w, tp_group=tp_group, ignore_index=ignore_index)
