"""Worker for the TP=2 fused-linear MCE test (run by ``torch.multiprocessing.spawn``).

Every rank holds the same hidden states and the full LM-head weight, computes an independent
float64 reference of the paper's loss on the full vocabulary, then ``linear_mce`` on its own vocab
shard of the weight through megatron's tensor-parallel group (real gloo). The hidden-state
gradient is summed over the group (as megatron's ColumnParallelLinear does); loss, ``dh`` and the
rank's rows of ``dW`` must match the reference. An assertion error on any rank fails the test.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

V, D, S = 64, 16, 4
I = -100


def _targets() -> torch.Tensor:
    """Every ownership pattern of a position's targets at TP=2 (V_local = 32)."""
    return torch.tensor([
        [1, 5, 30, 31], [32, 40, 63, 50], [3, 40, 7, 60], [0, 33, 0, 33], [9, 9, 9, 9],
        [I, I, I, I], [10, I, 45, I], [31, 32, I, 63], [12, 13, 14, 15], [62, I, I, I],
        [20, 21, 52, 53], [44, 44, 2, I],
    ])


def paper_loss(h, w_full, targets, c):
    """sum_k c_k * mean over the slot's non-ignored positions of (lse(z_n) - z_n[t]), float64."""
    z = h.double() @ w_full.double().t()
    lse = torch.logsumexp(z, 1)
    total = z.new_zeros(())
    for k in range(targets.shape[1]):
        rows = [n for n in range(targets.shape[0]) if targets[n, k] != I]
        if rows:
            total = total + c[k] * sum(lse[n] - z[n, targets[n, k]] for n in rows) / len(rows)
    return total


def run(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    from megatron.core import parallel_state

    from megatron_tst.tst.linear_loss import linear_mce, triton_available
    from megatron_tst.tst.loss import element_weights, slot_weights

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        group = parallel_state.get_tensor_model_parallel_group()
        v_local = V // world_size
        lo, hi = rank * v_local, (rank + 1) * v_local
        t = _targets()
        n = t.shape[0]
        impls = [("chunked", torch.float64, 1e-12), ("chunked", torch.float32, 2e-5)]
        if triton_available():
            impls.append(("triton", torch.float32, 2e-5))
        for j, (impl, dtype, tol) in enumerate(impls):
            for c in (slot_weights(S), slot_weights(S, "power_law")):
                gen = torch.Generator().manual_seed(10 + j)
                h0 = torch.randn(n, D, generator=gen, dtype=torch.float64)
                w0 = torch.randn(V, D, generator=gen, dtype=torch.float64)
                hr, wr = h0.clone().requires_grad_(), w0.clone().requires_grad_()
                ref = paper_loss(hr, wr, t, c.double())
                (2.0 * ref).backward()
                h = h0.to(dtype).requires_grad_()
                w = w0[lo:hi].to(dtype).requires_grad_()
                ew = element_weights(t, c, dtype=torch.promote_types(dtype, torch.float32))
                out = linear_mce(h, w, t, ew, impl=impl)  # megatron's TP group by default
                (2.0 * out).backward()
                dh = h.grad.clone()
                dist.all_reduce(dh, group=group)  # ColumnParallelLinear's input-grad all-reduce
                kw = dict(rtol=tol, atol=tol)
                torch.testing.assert_close(out.double(), ref.detach(), **kw,
                                           msg=lambda m: f"rank {rank} {impl} {dtype} loss: {m}")
                torch.testing.assert_close(dh.double(), hr.grad, **kw,
                                           msg=lambda m: f"rank {rank} {impl} {dtype} dh: {m}")
                torch.testing.assert_close(w.grad.double(), wr.grad[lo:hi], **kw,
                                           msg=lambda m: f"rank {rank} {impl} {dtype} dW: {m}")
                both = [torch.zeros_like(out) for _ in range(world_size)]
                dist.all_gather(both, out.detach(), group=group)
                assert all(torch.equal(b, both[0]) for b in both), f"{impl}: ranks disagree"
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
