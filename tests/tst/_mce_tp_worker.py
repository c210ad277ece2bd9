"""Worker for the TP=2 vocab-parallel MCE test (run by ``torch.multiprocessing.spawn``).

Every rank builds the same full logits, computes the TP=1 fused loss and gradient on them, then
the vocab-parallel loss on its own shard through megatron's tensor-parallel group, and asserts
that loss and gradient shard agree. An assertion error on any rank fails the spawning test.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

V, S = 64, 4  # vocab (32 columns per rank at TP=2), bag size
IGNORE = -100


def _targets() -> torch.Tensor:
    """Rows covering every ownership pattern of a position's targets at TP=2 (V_local = 32)."""
    I = IGNORE
    return torch.tensor([
        [1, 5, 30, 31],        # all on rank 0
        [32, 40, 63, 50],      # all on rank 1
        [3, 40, 7, 60],        # split
        [0, 33, 0, 33],        # split, duplicates
        [9, 9, 9, 9],          # one token four times
        [I, I, I, I],          # all ignored
        [10, I, 45, I],        # split with ignored slots
        [31, 32, I, 63],       # shard edges
        [12, 13, 14, 15],      # all on rank 0
        [62, I, I, I],         # the paper's last position: one real target, s-1 ignored
    ])


def run(rank: int, world_size: int, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        from megatron_tst.compat import apply_cpu_compat

        apply_cpu_compat()
    except ImportError:  # parallel_state's TP groups work on CPU without it
        pass
    from megatron.core import parallel_state

    from megatron_tst.tst.loss import (
        element_weights, mce_fused, mce_vocab_parallel, multi_hot_cross_entropy, slot_weights)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    try:
        group = parallel_state.get_tensor_model_parallel_group()
        assert dist.get_world_size(group) == world_size
        v_local = V // world_size
        lo, hi = rank * v_local, (rank + 1) * v_local
        targets = _targets()
        n = targets.shape[0]
        cases = [
            (torch.float64, slot_weights(S), 1.0, dict(rtol=1e-12, atol=1e-14)),
            (torch.float64, slot_weights(S, "power_law"), 2.5, dict(rtol=1e-12, atol=1e-14)),
            (torch.float32, slot_weights(S, "explicit", explicit=[4, 0, 1, 2]), 1.0,
             dict(rtol=2e-6, atol=1e-7)),
            (torch.float32, slot_weights(S), 0.5, dict(rtol=2e-6, atol=1e-7)),
        ]
        for i, (dtype, sw, g, tol) in enumerate(cases):
            gen = torch.Generator().manual_seed(100 + i)
            full = (torch.randn(n, V, generator=gen, dtype=torch.float64) * 4).to(dtype)
            # TP=1 fused on the full logits
            z = full.clone().requires_grad_()
            w = element_weights(targets, sw, dtype=torch.promote_types(dtype, torch.float32))
            ref = mce_fused(z, targets, w)
            (ref * g).backward()
            # TP=2 vocab-parallel on this rank's shard, through the one interface
            shard = full[:, lo:hi].clone().requires_grad_()
            out = multi_hot_cross_entropy(shard, targets, sw, impl="fused")
            (out * g).backward()
            torch.testing.assert_close(out, ref.detach(), **tol,
                                       msg=lambda m: f"rank {rank} case {i} loss: {m}")
            torch.testing.assert_close(shard.grad, z.grad[:, lo:hi], **tol,
                                       msg=lambda m: f"rank {rank} case {i} grad: {m}")
            # the loss is identical on every rank
            both = [torch.zeros_like(out) for _ in range(world_size)]
            dist.all_gather(both, out.detach(), group=group)
            assert all(torch.equal(b, both[0]) for b in both), f"case {i}: ranks disagree {both}"

        # bf16 shard: same numbers as the fp32 path on the bf16-rounded values, grad in bf16
        gen = torch.Generator().manual_seed(7)
        full = (torch.randn(n, V, generator=gen) * 4).to(torch.bfloat16)
        sw = slot_weights(S)
        z = full.float().requires_grad_()
        ref = mce_fused(z, targets, element_weights(targets, sw))
        ref.backward()
        shard = full[:, lo:hi].clone().requires_grad_()
        out = mce_vocab_parallel(shard, targets, element_weights(targets, sw), tp_group=group)
        out.backward()
        assert out.dtype == torch.float32 and shard.grad.dtype == torch.bfloat16
        torch.testing.assert_close(out, ref.detach(), rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(shard.grad.float(), z.grad[:, lo:hi], rtol=1e-2, atol=1e-5)
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
