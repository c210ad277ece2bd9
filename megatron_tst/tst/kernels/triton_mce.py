"""Triton kernels: fused LM head + multi-hot cross-entropy, logits never written to memory.

Three kernels, each streaming vocabulary blocks of the LM-head weight ``W`` (V_local, D) against
row blocks of the hidden states ``h`` (N, D); a block of logits ``h W^T`` (BM x BV, fp32
accumulation) lives only in registers/SRAM:

* ``_fwd``   grid over row blocks (x vocabulary splits when there are few rows): online logsumexp over the vocabulary blocks (running max and
  rescaled sum-exp per row) and the weighted sum of the target logits owned by this shard
  (each of the ``s`` slots compares its local id against the block's columns, so duplicates
  accumulate). Writes three floats per row.
* ``_bwd_dh`` grid over row blocks: recomputes each logits block, forms
  ``dz = g_n * (W_n * exp(z - lse_n) - sum_k w[n,k] [v == t[n,k]])`` and accumulates ``dz @ W``
  into the row block's own ``dh`` rows (no atomics).
* ``_bwd_dw`` grid over vocabulary blocks: the same ``dz`` and accumulates ``dz^T @ h`` into the
  block's own rows of ``dW`` (no atomics, deterministic).

The autograd glue is ``TritonLinearMCE`` below (called by ``tst/linear_loss.py``); the target
slots a rank owns and the cross-rank combination of the per-row statistics (vocab parallelism) are
``tst/vocab_shard.py``'s, shared with the chunked PyTorch implementation. Under
``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors through
Triton's interpreter; the operands of ``tl.dot`` are then upcast to fp32 first (the interpreter's
16-bit dot is not reliable), which gives the same fp32-accumulated values.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from megatron_tst.tst.vocab_shard import combine_stats, shard_targets

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _logits_block(h_ptr, w_ptr, rows, rmask, cols, cmask, D, stride_h, stride_w,
                  BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr):
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        dm = ds < D
        a = tl.load(h_ptr + rows[:, None] * stride_h + ds[None, :],
                    mask=rmask[:, None] & dm[None, :], other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :],
                    mask=cmask[:, None] & dm[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _fwd(h_ptr, w_ptr, t_ptr, wt_ptr, max_ptr, se_ptr, tgt_ptr, N, V, D, stride_h, stride_w,
         V_SPLIT, S: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
         UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)  # vocabulary split: [split*V_SPLIT, (split+1)*V_SPLIT)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < N
    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    se = tl.zeros([BM], dtype=tl.float32)
    tgt = tl.zeros([BM], dtype=tl.float32)
    v_end = tl.minimum(V, (split + 1) * V_SPLIT)
    for v0 in range(split * V_SPLIT, v_end, BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < V
        z = _logits_block(h_ptr, w_ptr, rows, rmask, cols, cmask, D, stride_h, stride_w,
                          BM, BV, BD, UPCAST, IEEE)
        z = tl.where((cols < v_end)[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        se = se * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
        for k in tl.static_range(S):
            t = tl.load(t_ptr + rows * S + k, mask=rmask, other=-1)
            wk = tl.load(wt_ptr + rows * S + k, mask=rmask, other=0.0)
            hit = (cols[None, :] == t[:, None]) & (cols < v_end)[None, :]
            tgt += wk * tl.sum(tl.where(hit, z, 0.0), axis=1)
    tl.store(max_ptr + split * N + rows, m, mask=rmask)
    tl.store(se_ptr + split * N + rows, se, mask=rmask)
    tl.store(tgt_ptr + split * N + rows, tgt, mask=rmask)


@triton.jit
def _dz_block(z, cols, cmask, rows, rmask, lse, scale, t_ptr, gw_ptr, S: tl.constexpr):
    """dz = scale_n * exp(z - lse_n) - sum_k gw[n,k] [col == t[n,k]]  (fp32, 0 outside)."""
    dz = tl.exp(z - lse[:, None]) * scale[:, None]
    for k in tl.static_range(S):
        t = tl.load(t_ptr + rows * S + k, mask=rmask, other=-1)
        gk = tl.load(gw_ptr + rows * S + k, mask=rmask, other=0.0)
        dz -= tl.where(cols[None, :] == t[:, None], gk[:, None], 0.0)
    return tl.where(cmask[None, :] & rmask[:, None], dz, 0.0)


@triton.jit
def _bwd_dh(h_ptr, w_ptr, t_ptr, gw_ptr, lse_ptr, scale_ptr, dh_ptr, N, V, D, stride_h, stride_w,
            S: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
            UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < N
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < V
        z = _logits_block(h_ptr, w_ptr, rows, rmask, cols, cmask, D, stride_h, stride_w,
                          BM, BV, BD, UPCAST, IEEE)
        dz = _dz_block(z, cols, cmask, rows, rmask, lse, scale, t_ptr, gw_ptr, S)
        dz = dz.to(w_ptr.dtype.element_ty)
        if UPCAST:
            dz = dz.to(tl.float32)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            dm = ds < D
            b = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :],
                        mask=cmask[:, None] & dm[None, :], other=0.0)
            if UPCAST:
                b = b.to(tl.float32)
            ptrs = dh_ptr + rows[:, None] * D + ds[None, :]
            msk = rmask[:, None] & dm[None, :]
            acc = tl.load(ptrs, mask=msk, other=0.0)
            if IEEE:
                acc = tl.dot(dz, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(dz, b, acc)
            tl.store(ptrs, acc, mask=msk)


@triton.jit
def _bwd_dw(h_ptr, w_ptr, t_ptr, gw_ptr, lse_ptr, scale_ptr, dw_ptr, N, V, D, stride_h, stride_w,
            S: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr,
            UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BV + tl.arange(0, BV)
    cmask = cols < V
    for r0 in range(0, N, BM):
        rows = r0 + tl.arange(0, BM)
        rmask = rows < N
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        scale = tl.load(scale_ptr + rows, mask=rmask, other=0.0)
        z = _logits_block(h_ptr, w_ptr, rows, rmask, cols, cmask, D, stride_h, stride_w,
                          BM, BV, BD, UPCAST, IEEE)
        dz = _dz_block(z, cols, cmask, rows, rmask, lse, scale, t_ptr, gw_ptr, S)
        dz = dz.to(h_ptr.dtype.element_ty)
        if UPCAST:
            dz = dz.to(tl.float32)
        dzt = tl.trans(dz)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            dm = ds < D
            a = tl.load(h_ptr + rows[:, None] * stride_h + ds[None, :],
                        mask=rmask[:, None] & dm[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
            ptrs = dw_ptr + cols[:, None] * D + ds[None, :]
            msk = cmask[:, None] & dm[None, :]
            acc = tl.load(ptrs, mask=msk, other=0.0)
            if IEEE:
                acc = tl.dot(dzt, a, acc, input_precision="ieee")
            else:
                acc = tl.dot(dzt, a, acc)
            tl.store(ptrs, acc, mask=msk)


def _blocks(d: int):
    if INTERPRET:  # small blocks: the interpreter's cost is per element
        return 16, 32, 16
    return 64, 128, 64 if d >= 64 else 32


def _vocab_splits(n: int, v_local: int, bm: int, bv: int, device: torch.device):
    """Split the vocabulary over a second grid axis when there are too few row blocks to fill
    the GPU (each split writes its own partial statistics, combined afterwards)."""
    blocks = triton.cdiv(max(v_local, 1), bv)
    if INTERPRET:  # exercise the combination in the CPU tests
        splits = min(2, blocks)
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        splits = max(1, min(blocks, (4 * sms) // max(1, triton.cdiv(n, bm))))
    v_split = triton.cdiv(blocks, splits) * bv
    return triton.cdiv(max(v_local, 1), v_split), v_split


def _meta(h: torch.Tensor):
    if h.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton kernel takes fp32/bf16/fp16 inputs, got {h.dtype}")
    return dict(UPCAST=INTERPRET or h.dtype == torch.float32, IEEE=INTERPRET or h.dtype == torch.float32)


class TritonLinearMCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, ignore_index, group, rank, world_size):
        h = hidden.detach().contiguous()
        wt = weight.detach().contiguous()
        if wt.dtype != h.dtype:
            raise ValueError(f"hidden {h.dtype} and weight {wt.dtype} must have one dtype")
        n, d = h.shape
        v_local = wt.shape[0]
        s = targets.shape[1]
        # fp32 weights; local ids int32, -1 where not owned (matches no column in the kernels)
        w, _, local_t, w_own = shard_targets(targets, weights, ignore_index, rank, v_local,
                                             torch.float32, fill=-1, id_dtype=torch.int32)
        local_t, w_own = local_t.contiguous(), w_own.contiguous()
        bm, bv, bd = _blocks(d)
        splits, v_split = _vocab_splits(n, v_local, bm, bv, h.device)
        part = torch.empty(3, splits, n, dtype=torch.float32, device=h.device)
        if n > 0:
            _fwd[(triton.cdiv(n, bm), splits)](h, wt, local_t, w_own, part[0], part[1], part[2],
                                               n, v_local, d, h.stride(0), wt.stride(0), v_split,
                                               S=s, BM=bm, BV=bv, BD=bd, **_meta(h))
        # combine the vocabulary splits: the max, the sum-exp rescaled to it, the target sums
        row_max = part[0].amax(0)
        sum_exp = (part[1] * torch.exp(part[0] - row_max)).sum(0)
        tgt = part[2].sum(0)
        loss, lse = combine_stats(row_max, sum_exp, tgt, w.sum(1), group, world_size)
        ctx.save_for_backward(h, wt, local_t, w, w_own, lse)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        h, wt, local_t, w, w_own, lse = ctx.saved_tensors
        n, d = h.shape
        v_local = wt.shape[0]
        s = local_t.shape[1]
        g = grad_loss.float().expand(n)
        scale = (g * w.sum(1)).contiguous()
        gw = (g.unsqueeze(1) * w_own).contiguous()
        dh = torch.zeros(n, d, dtype=torch.float32, device=h.device)
        dw = torch.zeros(v_local, d, dtype=torch.float32, device=h.device)
        bm, bv, bd = _blocks(d)
        meta = dict(S=s, BM=bm, BV=bv, BD=bd, **_meta(h))
        if n > 0:
            _bwd_dh[(triton.cdiv(n, bm),)](h, wt, local_t, gw, lse, scale, dh, n, v_local, d,
                                           h.stride(0), wt.stride(0), **meta)
            _bwd_dw[(triton.cdiv(v_local, bv),)](h, wt, local_t, gw, lse, scale, dw, n, v_local, d,
                                                 h.stride(0), wt.stride(0), **meta)
        return dh.to(h.dtype), dw.to(wt.dtype), None, None, None, None, None, None
