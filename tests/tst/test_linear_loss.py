"""Fused linear + multi-hot CE (``tst/linear_loss.py``, ``tst/kernels/triton_mce.py``).

Both implementations against an independent float64 reference written from the paper's
definition (logits materialised, a loop over positions and slots): loss and the gradients for the
hidden states and the LM-head weight, with duplicates, ignored slots, power-law slot weights,
s in {1, 4}. The Triton kernels run on CPU through Triton's interpreter (``TRITON_INTERPRET=1``),
in a fresh process (``_triton_interp_checks``): the variable must be set before Triton is first
imported, and something else in the pytest process may have imported it already.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from megatron_tst.tst import linear_loss as LL
from megatron_tst.tst.linear_loss import linear_mce
from megatron_tst.tst.loss import element_weights, slot_weights

I = -100

try:
    import importlib.util

    HAVE_TRITON = importlib.util.find_spec("triton") is not None
except (ImportError, ValueError):
    HAVE_TRITON = False

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")


def _bags(n: int, s: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (n, s), generator=g)
    t[torch.rand(n, s, generator=g) < 0.15] = I
    if s > 1:
        t[0, 1] = t[0, 0]  # a duplicate in a bag
        t[1, :] = t[1, 0]  # one token s times
        t[-1, 1:] = I  # the paper's last position
        t[-1, 0] = vocab - 1  # on the last column
    t[2, :] = I  # every slot ignored
    return t


def paper_loss(h, w, targets, c):
    """The paper: sum_k c_k * [mean over slot k's non-ignored positions of lse(z_n) - z_n[t]]."""
    z = h.double() @ w.double().t()
    lse = torch.logsumexp(z, 1)
    total = z.new_zeros(())
    for k in range(targets.shape[1]):
        terms = [lse[n] - z[n, targets[n, k]] for n in range(targets.shape[0])
                 if targets[n, k] != I]
        if terms:
            total = total + c[k] * torch.stack(terms).mean()
    return total


def _problem(n, vocab, d, s, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64) * 0.7
    t = _bags(n, s, vocab, seed)
    c = slot_weights(s, "power_law", power=1.0) if kind == "power_law" else slot_weights(s)
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = paper_loss(hr, wr, t, c.double())
    (1.5 * ref).backward()
    return h, w, t, c, ref.detach(), hr.grad, wr.grad


def _run(impl, h, w, t, c, dtype):
    hh = h.detach().to(dtype, copy=True).requires_grad_()
    ww = w.detach().to(dtype, copy=True).requires_grad_()
    ew = element_weights(t, c, dtype=torch.promote_types(dtype, torch.float32))
    out = linear_mce(hh, ww, t, ew, impl=impl, tp_group=None)
    (1.5 * out).backward()
    assert hh.grad.dtype == dtype and ww.grad.dtype == dtype
    return out.detach().double(), hh.grad.double(), ww.grad.double()


def _check(got, want, tol):
    for a, b, what in zip(got, want, ("loss", "dh", "dW")):
        scale = b.abs().max().clamp_min(1e-30)
        err = float((a - b).abs().max() / scale)
        assert err <= tol, f"{what}: max error {err:.3g} (relative to max |ref|) > {tol}"


@pytest.mark.parametrize("s", [1, 4])
@pytest.mark.parametrize("kind", ["uniform", "power_law"])
@pytest.mark.parametrize("chunk", [None, 7 * 40])
def test_chunked_matches_paper_float64(s, kind, chunk, monkeypatch):
    monkeypatch.setattr(LL, "CHUNK_ELEMENTS", chunk)  # 7 rows of V=40 per chunk: ragged chunks
    h, w, t, c, ref, dh, dw = _problem(33, 40, 12, s, kind, seed=s)
    _check(_run("chunked", h, w, t, c, torch.float64), (ref, dh, dw), 1e-12)
    _check(_run("chunked", h, w, t, c, torch.float32), (ref, dh, dw), 2e-5)


def test_chunked_bf16_and_per_position(monkeypatch):
    monkeypatch.setattr(LL, "CHUNK_ELEMENTS", 5 * 40)
    h, w, t, c, ref, dh, dw = _problem(21, 40, 16, 4, "power_law", seed=3)
    _check(_run("chunked", h, w, t, c, torch.bfloat16), (ref, dh, dw), 3e-2)
    # reduction="none": the per-position losses sum to the loss; s=1 with w=1 is the token CE
    ew = element_weights(t, c, dtype=torch.float64)
    per = linear_mce(h, w, t, ew, reduction="none")
    assert per.shape == (21,)
    torch.testing.assert_close(per.sum(), ref, rtol=1e-12, atol=1e-12)
    tok = t[:, 0].clamp_min(0)
    ce = linear_mce(h, w, tok, torch.ones(21, dtype=torch.float64), reduction="none")
    want = torch.nn.functional.cross_entropy(h @ w.t(), tok, reduction="none")
    torch.testing.assert_close(ce, want, rtol=1e-12, atol=1e-12)


def test_interface_errors():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    t = torch.zeros(4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="impl must be"):
        linear_mce(h, w, t, torch.ones(4, 2), impl="nope")
    with pytest.raises(ValueError, match="hidden"):
        linear_mce(h, torch.randn(10, 7), t, torch.ones(4, 2))
    with pytest.raises(ValueError, match="targets"):
        linear_mce(h, w, t, torch.ones(4, 3))


@pytest.fixture(scope="module")
def interpreted():
    """The Triton checks of ``_triton_interp_checks``, run once in a fresh process with
    ``TRITON_INTERPRET=1`` set before Triton is imported (see that module)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.tst._triton_interp_checks"], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
@pytest.mark.parametrize("s", [1, 4])
@pytest.mark.parametrize("kind", ["uniform", "power_law"])
def test_triton_interpreter_matches_paper(s, kind, interpreted):
    """fp32 inputs, N=37, V=70, D=24 (ragged blocks), against the float64 reference: 2e-5."""
    assert interpreted[f"fp32-{kind}-{s}"] == "ok"


@needs_triton
def test_triton_interpreter_bf16(interpreted):
    """bf16 inputs, fp32 accumulation: the reference to 3e-2, and the chunked path on the same
    bf16 inputs to 3e-2."""
    assert interpreted["bf16"] == "ok"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tp2_matches_paper():
    """Two gloo processes, megatron TP group of 2, V=64 split 32/32: chunked (f64, f32) and, where
    Triton is installed, the interpreted kernel (see _linear_mce_tp_worker)."""
    import torch.multiprocessing as mp

    from tests.tst import _linear_mce_tp_worker

    mp.spawn(_linear_mce_tp_worker.run, args=(2, _free_port()), nprocs=2, join=True)


def test_benchmark_linear_smoke(capsys):
    """benchmarks/mce_loss.py --linear runs end to end on a tiny problem (CPU: no Triton column)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "mce_loss.py"
    spec = importlib.util.spec_from_file_location("mce_loss_bench_linear", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--linear", "--n", "64", "--vocab", "512", "--bag", "1", "4", "--hidden", "16",
                "--runs", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "ref/chunk" in out and "\n    512   4 |" in out
