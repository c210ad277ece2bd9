"""Multi-hot cross-entropy: reference vs fused vs vocab-parallel, weights, numerics."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F

from megatron_tst.tst import loss as L
from megatron_tst.tst.loss import (
    element_weights,
    mce_fused,
    mce_reference,
    mce_vocab_parallel,
    multi_hot_cross_entropy,
    slot_weights,
)

I = -100


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several row chunks (and a ragged last one) through the fused kernels."""
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 3 * 16)


def _bags(n: int, s: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random bags with duplicates, ignored slots, the paper's last-position pattern, an
    all-ignored position, and (for s > 1) one slot ignored at every position."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (n, s), generator=g)
    t[torch.rand(n, s, generator=g) < 0.15] = I
    if s > 1:
        t[0, 1] = t[0, 0]  # a duplicate token in a bag
        t[1, :] = t[1, 0]  # one token s times
        t[-1, 1:] = I  # the paper's last latent position: one real target, s-1 ignored
        t[-1, 0] = 3
    t[2, :] = I  # a position with every slot ignored
    return t


def _weights(kind: str, s: int) -> torch.Tensor:
    if kind == "uniform":
        return slot_weights(s)
    if kind == "power_law":
        return slot_weights(s, "power_law", power=1.0)
    return slot_weights(s, "explicit", explicit=[float((3 * k) % 5) + 0.5 for k in range(s)])


def _loss_and_grad(fn, logits, *args, scale=1.0):
    z = logits.detach().clone().requires_grad_()
    out = fn(z, *args)
    (out * scale).backward()
    return out.detach(), z.grad


# ------------------------------------------------------------------------------------ weights
def test_slot_weights_values():
    torch.testing.assert_close(slot_weights(4), torch.full((4,), 0.25))
    assert slot_weights(1).tolist() == [1.0]
    pl = slot_weights(4, "power_law")
    expect = torch.tensor([1, 1 / 2, 1 / 3, 1 / 4], dtype=torch.float64)
    torch.testing.assert_close(pl, (expect / expect.sum()).float())
    pl2 = slot_weights(3, "power_law", power=2.0)
    expect = torch.tensor([1, 1 / 4, 1 / 9], dtype=torch.float64)
    torch.testing.assert_close(pl2, (expect / expect.sum()).float())
    ex = slot_weights(3, "explicit", explicit=[2, 0, 6])
    torch.testing.assert_close(ex, torch.tensor([0.25, 0.0, 0.75]))
    for w in (slot_weights(6), pl, ex):
        assert w.dtype == torch.float32 and abs(float(w.sum()) - 1) < 1e-6


@pytest.mark.parametrize("kwargs, match", [
    (dict(bag_size=0), "bag_size"),
    (dict(bag_size=2.0), "bag_size"),
    (dict(bag_size=4, weighting="linear"), "weighting"),
    (dict(bag_size=3, weighting="explicit"), "explicit"),
    (dict(bag_size=3, weighting="explicit", explicit=[1, 2]), "length 2, expected bag_size=3"),
    (dict(bag_size=3, weighting="explicit", explicit=[1, -1, 2]), "non-negative"),
    (dict(bag_size=3, weighting="explicit", explicit=[0, 0, 0]), "all zero"),
    (dict(bag_size=2, weighting="explicit", explicit=[1, float("nan")]), "finite"),
    (dict(bag_size=2, weighting="explicit", explicit=["a", 1]), "numbers"),
    (dict(bag_size=2, explicit=[1, 1]), "weighting='explicit'"),
    (dict(bag_size=2, weighting="power_law", power=float("inf")), "power"),
])
def test_slot_weights_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        slot_weights(**kwargs)


def test_element_weights():
    t = torch.tensor([[1, 2, I], [3, I, I], [I, 4, I], [5, 5, I]])
    c = torch.tensor([0.5, 0.3, 0.2])
    w = element_weights(t, c)
    m = (t != I).float()
    expect = c * m / m.sum(0).clamp_min(1)
    assert w.dtype == torch.float32 and torch.equal(w, expect)
    w64 = element_weights(t, c.double(), dtype=torch.float64)
    expect64 = c.double() * m.double() / m.sum(0).double().clamp_min(1)
    assert w64.dtype == torch.float64 and torch.equal(w64, expect64)
    assert torch.all(w[t == I] == 0)
    # slots with a valid target contribute their c_k in total; the all-ignored slot contributes 0
    torch.testing.assert_close(w.sum(0), torch.tensor([0.5, 0.3, 0.0]))
    # (..., s) targets: averaged over all leading dims
    torch.testing.assert_close(element_weights(t.view(2, 2, 3), c), w.view(2, 2, 3))
    with pytest.raises(ValueError, match="slot weights have shape"):
        element_weights(t, torch.ones(2) / 2)
    with pytest.raises(ValueError, match="integer"):
        element_weights(t.float(), c)


# ----------------------------------------------------------------------- fused vs reference
@pytest.mark.parametrize("s", [1, 4, 6])
@pytest.mark.parametrize("kind", ["uniform", "power_law", "explicit"])
def test_fused_matches_reference_float64(s, kind, small_chunks):
    n, vocab = 13, 16
    logits = torch.randn(n, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
    logits[4] *= 30  # a peaked row
    t = _bags(n, s, vocab, seed=s)
    sw = _weights(kind, s)
    ref, gref = _loss_and_grad(mce_reference, logits, t, sw, scale=1.7)
    w = element_weights(t, sw, dtype=torch.float64)
    out, g = _loss_and_grad(mce_fused, logits, t, w, scale=1.7)
    assert out.dtype == torch.float64 and g.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(g, gref, rtol=1e-12, atol=1e-14)
    # the one interface, every implementation
    for impl in ("fused", "reference"):
        o2, g2 = _loss_and_grad(lambda z: multi_hot_cross_entropy(z, t, sw, impl=impl), logits)
        torch.testing.assert_close(o2, ref, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(g2 * 1.7, gref, rtol=1e-12, atol=1e-14)


def test_fused_equals_paper_formula():
    """Against an explicit loop over the definition (mean of s CE, each over its own positions)."""
    n, vocab, s = 9, 11, 4
    logits = torch.randn(n, vocab, dtype=torch.float64)
    t = _bags(n, s, vocab, seed=3)
    t[:, 2] = I  # a slot with no valid target contributes 0
    sw = _weights("power_law", s)
    lse = torch.logsumexp(logits, -1)
    expect = 0.0
    for k in range(s):
        rows = [i for i in range(n) if t[i, k] != I]
        if rows:
            ce = [float(lse[i] - logits[i, t[i, k]]) for i in rows]
            expect += float(sw[k]) * sum(ce) / len(rows)
    out = mce_fused(logits, t, element_weights(t, sw, dtype=torch.float64))
    assert abs(out.item() - expect) < 1e-12
    # default float32 weights: the weights' rounding (~1e-8 relative) is the only difference
    assert abs(mce_fused(logits, t, element_weights(t, sw)).item() - expect) < 1e-7 * abs(expect)


@pytest.mark.parametrize("chunks", [False, True])
def test_gradcheck_fused(chunks, monkeypatch):
    if chunks:
        monkeypatch.setattr(L, "CHUNK_ELEMENTS", 2 * 7)
    n, vocab, s = 6, 7, 4
    t = torch.tensor([[1, 1, 2, I], [3, I, I, I], [I, I, I, I], [0, 6, 6, 6], [5, 4, I, 2],
                      [2, I, I, I]])
    for sw in (slot_weights(s), slot_weights(s, "power_law"),
               slot_weights(s, "explicit", explicit=[0.1, 0.0, 0.6, 0.3])):
        w = element_weights(t, sw)
        z = torch.randn(n, vocab, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: mce_fused(x, t, w), (z,))
    # s = 1, the exact-mean path
    t1 = torch.tensor([[1], [I], [4], [6], [0], [1]])
    w1 = element_weights(t1, slot_weights(1))
    z = torch.randn(n, vocab, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mce_fused(x, t1, w1), (z,))


def test_gradcheck_vocab_parallel_algorithm_single_rank(small_chunks):
    """The vocab-parallel kernels themselves (world size 1, no communication)."""
    n, vocab, s = 6, 7, 3
    t = torch.tensor([[1, 1, 2], [3, I, I], [I, I, I], [0, 6, 6], [5, 4, I], [2, I, I]])
    w = element_weights(t, slot_weights(s, "power_law"))
    z = torch.randn(n, vocab, dtype=torch.float64, requires_grad=True)
    fn = lambda x: L._VocabParallelMCE.apply(x, t, w, I, None, 0, 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z,))
    # and it agrees with the fused path, in float64 and float32
    for dtype, tol in ((torch.float64, 1e-13), (torch.float32, 2e-6)):
        zz = (torch.randn(40, 50, dtype=torch.float64) * 3).to(dtype)
        tt = _bags(40, 5, 50)
        ww = element_weights(tt, slot_weights(5))
        a, ga = _loss_and_grad(mce_fused, zz, tt, ww)
        b, gb = _loss_and_grad(lambda x: L._VocabParallelMCE.apply(x, tt, ww, I, None, 0, 1), zz)
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
        torch.testing.assert_close(gb, ga, rtol=tol, atol=tol * 1e-2)


def test_fused_saves_no_vocab_sized_buffer():
    z = torch.randn(32, 100, requires_grad=True)
    t = _bags(32, 4, 100)
    out = mce_fused(z, t, element_weights(t, slot_weights(4)))
    big = [x for x in out.grad_fn.saved_tensors if x.numel() >= z.numel()]
    assert len(big) == 1 and big[0].data_ptr() == z.data_ptr()  # only the logits themselves


def test_all_ignored_and_empty():
    z = torch.randn(5, 8, requires_grad=True)
    t = torch.full((5, 3), I)
    for impl in ("fused", "reference"):
        out = multi_hot_cross_entropy(z, t, slot_weights(3), impl=impl)
        out.backward()
        assert out.item() == 0.0 and torch.count_nonzero(z.grad) == 0
        z.grad = None
    e = torch.randn(0, 8, requires_grad=True)
    out = mce_fused(e, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    out.backward()
    assert out.item() == 0.0 and e.grad.shape == (0, 8)


# ------------------------------------------------------------------------------------- bf16
def test_bf16_logits(small_chunks):
    n, vocab, s = 24, 40, 4
    z32 = torch.randn(n, vocab) * 3
    zb = z32.to(torch.bfloat16)
    t = _bags(n, s, vocab)
    w = element_weights(t, slot_weights(s, "power_law"))
    out, g = _loss_and_grad(mce_fused, zb, t, w)
    assert out.dtype == torch.float32 and g.dtype == torch.bfloat16
    # computed in fp32: identical to the fp32 path on the bf16-rounded values
    ref_b, gref_b = _loss_and_grad(mce_fused, zb.float(), t, w)
    assert torch.equal(out, ref_b) and torch.equal(g, gref_b.to(torch.bfloat16))
    # and close to the fp32 result on the unrounded logits
    ref, gref = _loss_and_grad(mce_reference, z32, t, slot_weights(s, "power_law"))
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(g.float(), gref, rtol=5e-2, atol=2e-3)


# ------------------------------------------------------------------------- s = 1 is plain CE
@pytest.mark.parametrize("n, vocab, chunk", [(1, 5, None), (37, 1000, None), (700, 513, 64 * 513),
                                             (4099, 257, None), (300, 5000, 7 * 5000)])
def test_s1_is_cross_entropy_bitwise(n, vocab, chunk, monkeypatch):
    monkeypatch.setattr(L, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(n, vocab, generator=g) * 4
    t = torch.randint(0, vocab, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.2] = I
    t[0] = 1
    for scale in (1.0, 0.37):
        ref, gref = _loss_and_grad(lambda z: F.cross_entropy(z, t, ignore_index=I), logits,
                                   scale=scale)
        mce = lambda z: multi_hot_cross_entropy(z, t[:, None], slot_weights(1))  # noqa: E731
        out, gout = _loss_and_grad(mce, logits, scale=scale)
        assert torch.equal(out, ref), (out - ref).item()
        assert torch.equal(gout, gref), (gout - gref).abs().max().item()
        # mce_fused directly, and targets without a slot dim
        out2 = mce_fused(logits, t[:, None], element_weights(t[:, None], slot_weights(1)))
        assert torch.equal(out2, ref)
        assert torch.equal(multi_hot_cross_entropy(logits, t, slot_weights(1)), ref)


def test_s1_megatron_layout_bitwise():
    """(L, B, V) logits with (L, B) labels, as megatron's output layer produces them."""
    z = torch.randn(16, 3, 300)
    t = torch.randint(0, 300, (16, 3))
    t[-1] = I
    ref = F.cross_entropy(z.view(-1, 300), t.view(-1))
    assert torch.equal(multi_hot_cross_entropy(z, t.unsqueeze(-1), slot_weights(1)), ref)


def test_single_weighted_slot_bitwise():
    """explicit=[1, 0, 0]: slot 0 is a plain mean, so it is exactly F.cross_entropy of slot 0."""
    z = torch.randn(50, 64)
    t = _bags(50, 3, 64)
    ref = F.cross_entropy(z, t[:, 0])
    out = multi_hot_cross_entropy(z, t, slot_weights(3, "explicit", explicit=[1, 0, 0]))
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------ interface
def test_interface_errors():
    z = torch.randn(4, 10)
    t = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="impl"):
        multi_hot_cross_entropy(z, t, slot_weights(2), impl="fast")
    with pytest.raises(ValueError, match="leading dims"):
        multi_hot_cross_entropy(z, torch.zeros(3, 2, dtype=torch.long), slot_weights(2))
    with pytest.raises(ValueError, match="weights must have the shape"):
        mce_fused(z, t, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="logits must be"):
        mce_fused(z.view(2, 2, 10), t, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="integer"):
        mce_fused(z, t.float(), torch.zeros(4, 2))


# ---------------------------------------------------------------------------- TP = 2 (gloo)
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_vocab_parallel_tp2_matches_fused():
    """Two gloo processes, megatron TP group of 2, V=64 sharded 32/32 (see _mce_tp_worker)."""
    import torch.multiprocessing as mp

    from tests.tst import _mce_tp_worker

    mp.spawn(_mce_tp_worker.run, args=(2, _free_port()), nprocs=2, join=True)


def test_vocab_parallel_tp1_is_fused():
    """A TP group of one rank: mce_vocab_parallel is mce_fused (bitwise)."""
    import torch.distributed as dist

    owned = not dist.is_initialized()  # the session's megatron_env may have made one already
    if owned:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                world_size=1)
    assert dist.get_world_size() == 1
    try:
        group = dist.new_group([0])
        z = torch.randn(20, 30)
        t = _bags(20, 4, 30)
        w = element_weights(t, slot_weights(4))
        a, ga = _loss_and_grad(mce_fused, z, t, w)
        b, gb = _loss_and_grad(lambda x: mce_vocab_parallel(x, t, w, tp_group=group), z)
        assert torch.equal(a, b) and torch.equal(ga, gb)
    finally:
        if owned:
            dist.destroy_process_group()


def test_benchmark_script_smoke(capsys):
    """benchmarks/mce_loss.py runs end to end on a tiny problem (CPU memory via the profiler)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "mce_loss.py"
    spec = importlib.util.spec_from_file_location("mce_loss_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--n", "64", "--vocab", "512", "--bag", "4", "--runs", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "fused/CE" in out and "\n    512   4 |" in out
