"""Benchmark the multi-hot cross-entropy: fused vs reference (s CE calls) vs one plain CE.

    python benchmarks/mce_loss.py            # CPU, N=2048, V in {32768, 131072}, s in {4, 8, 16}
    python benchmarks/mce_loss.py --quick              # N=512, fewer runs
    python benchmarks/mce_loss.py --device cuda --n 8192 --dtype bfloat16
    python benchmarks/mce_loss.py --linear   # LM head + loss: reference vs chunked vs Triton

``--linear`` benchmarks the loss together with the LM head, from hidden states ``h`` (N, D) and
the weight ``W`` (V, D) (``--hidden``, default 256 on CPU, 4096 on CUDA), for s in {1, 4, 16}:
"reference" materialises the logits ``h W^T`` and takes s cross-entropies, "fused" materialises
them and runs the fused MCE (the ``fused`` implementation), "chunked" and "triton" are
``tst.linear_loss.linear_mce`` (no logits), "plain CE" is one cross-entropy on materialised logits.
Memory there is the peak above the inputs, the gradients of h and W included; "transient" is the
peak minus those gradients. Triton is measured where CUDA and Triton are available.

For every (V, s) it times forward+backward (median over ``--runs`` after ``--warmup``) and
measures the peak extra memory of one forward+backward (the gradient included, the logits not):
``torch.cuda.max_memory_allocated`` on CUDA, the allocator events of ``torch.profiler`` with
``profile_memory=True`` on CPU. "plain CE" is ONE ``F.cross_entropy`` on the same logits (slot 0):
the cost of an ordinary next-token step, which the fused MCE should stay within 1.25x of. The
reference keeps s log-softmax outputs alive, so it is skipped when its estimated memory exceeds
``--max-ref-gib``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_tst.tst.loss import multi_hot_cross_entropy, slot_weights  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn, z: torch.Tensor) -> None:
    z.grad = None
    fn(z).backward()


def time_it(fn, z: torch.Tensor, runs: int, warmup: int, stat: str = "median") -> float:
    for _ in range(warmup):
        _step(fn, z)
    _sync(z.device)
    times = []
    for _ in range(runs):
        _sync(z.device)
        t0 = time.perf_counter()
        _step(fn, z)
        _sync(z.device)
        times.append(time.perf_counter() - t0)
    z.grad = None
    return min(times) if stat == "min" else statistics.median(times)


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints start/stop lines on the C-level stderr; hide them while profiling."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(fn, z: torch.Tensor) -> int:
    """Peak memory allocated above the starting point during one forward+backward."""
    z.grad = None
    if z.device.type == "cuda":
        torch.cuda.synchronize(z.device)
        base = torch.cuda.memory_allocated(z.device)
        torch.cuda.reset_peak_memory_stats(z.device)
        _step(fn, z)
        torch.cuda.synchronize(z.device)
        peak = torch.cuda.max_memory_allocated(z.device) - base
    else:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU],
                                      profile_memory=True) as prof:
            _step(fn, z)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        cur = peak = 0
        for e in events:
            cur += e.nbytes()
            peak = max(peak, cur)
    z.grad = None
    return peak


def _linear_step(fn, leaves) -> None:
    for x in leaves:
        x.grad = None
    fn().backward()


def linear_time(fn, leaves, runs: int, warmup: int, stat: str = "median") -> float:
    dev = leaves[0].device
    for _ in range(warmup):
        _linear_step(fn, leaves)
    times = []
    for _ in range(runs):
        _sync(dev)
        t0 = time.perf_counter()
        _linear_step(fn, leaves)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    for x in leaves:
        x.grad = None
    return min(times) if stat == "min" else statistics.median(times)


def linear_peak(fn, leaves) -> int:
    """Peak memory allocated above the inputs during one forward+backward, gradients included."""
    class _Leaf:  # peak_bytes' interface: a tensor-like whose step runs fn on all leaves
        device = leaves[0].device
        grad = None

    holder = _Leaf()
    return peak_bytes(lambda _: _LinearLoss(fn, leaves), holder)


class _LinearLoss:
    """Adapts a closure over several leaves to peak_bytes' ``fn(z).backward()``."""

    def __init__(self, fn, leaves):
        for x in leaves:
            x.grad = None
        self.loss = fn()

    def backward(self):
        self.loss.backward()


def linear_main(a, device, dtype, n, runs, ref_runs) -> None:
    from megatron_tst.tst.linear_loss import linear_mce
    from megatron_tst.tst.loss import element_weights

    have_triton = False
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
            have_triton = True
        except ImportError:
            pass
    d = a.hidden or (4096 if device.type == "cuda" else 256)
    bags = a.bag if a.bag_given else [1, 4, 16]
    esize = torch.finfo(dtype).bits // 8
    print(f"# LM head + loss: N={n}, D={d}, inputs {a.dtype}; memory = peak above the inputs "
          f"during fwd+bwd, gradients of h and W included; transient = peak - gradients")
    head = (f"{'V':>7} {'s':>3} | {'CE ms':>8} {'ref ms':>8} {'fused ms':>8} {'chunk ms':>8} "
            f"{'triton ms':>9} | {'CE MiB':>7} {'ref MiB':>7} {'fused MiB':>9} {'chunk MiB':>9} "
            f"{'triton MiB':>10} | {'ref/chunk':>9} | {'chunk trans':>11} {'triton trans':>12}")
    print(head)
    print("-" * len(head))
    for vocab in a.vocab:
        h = (torch.randn(n, d, device=device) / d ** 0.25).to(dtype).requires_grad_()
        w = (torch.randn(vocab, d, device=device) / d ** 0.25).to(dtype).requires_grad_()
        leaves = [h, w]
        grads = (n + vocab) * d * esize
        plain_cols = None
        for s in bags:
            t = torch.randint(0, vocab, (n, s), device=device)
            t[-1, 1:] = -100
            sw = slot_weights(s).to(device)
            ew = element_weights(t, sw)

            def plain(t=t):
                return F.cross_entropy((h @ w.t()).float(), t[:, 0])

            def ref(t=t, sw=sw):
                return multi_hot_cross_entropy(h @ w.t(), t, sw, impl="reference")

            def fused(t=t, sw=sw):
                return multi_hot_cross_entropy(h @ w.t(), t, sw, impl="fused")

            def chunked(t=t, ew=ew):
                return linear_mce(h, w, t, ew, impl="chunked")

            def trit(t=t, ew=ew):
                return linear_mce(h, w, t, ew, impl="triton")

            def measure(fn, r):
                return linear_time(fn, leaves, r, a.warmup, a.stat), linear_peak(fn, leaves)

            if plain_cols is None:
                plain_cols = measure(plain, runs)
            ref_gib = (s + 3) * n * vocab * 4 / 2**30
            rr = measure(ref, ref_runs) if ref_gib <= a.max_ref_gib else None
            fu = measure(fused, runs) if 3 * n * vocab * 4 / 2**30 <= a.max_ref_gib else None
            ch = measure(chunked, runs)
            tr = measure(trit, runs) if have_triton else None

            def ms(x):
                return f"{x[0] * 1e3:8.1f}" if x else f"{'-':>8}"

            def mib(x, width, est=None):
                if x:
                    return f"{x[1] / 2**20:{width}.0f}"
                return f"{(f'~{est:.0f}G' if est else '-'):>{width}}"

            ratio = f"{rr[1] / ch[1]:9.1f}" if rr else f"{'-':>9}"
            print(f"{vocab:>7} {s:>3} | {ms(plain_cols)} {ms(rr)} {ms(fu)} {ms(ch)} "
                  f"{(ms(tr) if tr else f'{chr(45):>9}'):>9} | {mib(plain_cols, 7)} "
                  f"{mib(rr, 7, ref_gib)} {mib(fu, 9)} {mib(ch, 9)} {mib(tr, 10)} | {ratio} | "
                  f"{(ch[1] - grads) / 2**20:11.0f} "
                  f"{(f'{(tr[1] - grads) / 2**20:12.0f}' if tr else f'{chr(45):>12}')}",
                  flush=True)
        del h, w, leaves
    print(f"# gradients of h and W: (N + V) * D * {esize} bytes; one (N, V) fp32 logits buffer = "
          + ", ".join(f"V={v}: {n * v * 4 / 2**20:.0f} MiB" for v in a.vocab)
          + ("" if have_triton else "; triton: not measured (needs CUDA and Triton)"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--n", type=int, default=None, help="positions N (default 2048 cpu, 8192 cuda)")
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--bag", type=int, nargs="+", default=None,
                   help="bag sizes s (default 4 8 16; with --linear 1 4 16)")
    p.add_argument("--linear", action="store_true",
                   help="LM head + loss from hidden states: reference vs fused vs chunked vs Triton")
    p.add_argument("--hidden", type=int, default=None, help="--linear: D (256 cpu, 4096 cuda)")
    p.add_argument("--runs", type=int, default=5, help="timed runs (median); reference: half")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--stat", default="median", choices=["median", "min"],
                   help="statistic over the timed runs (min is robust on a shared, noisy host)")
    p.add_argument("--max-ref-gib", type=float, default=6.0,
                   help="skip the reference when (s+2)*N*V*4 bytes exceeds this")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    p.add_argument("--quick", action="store_true", help="N=512, 3 runs")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.bag_given = a.bag is not None
    if a.bag is None:
        a.bag = [4, 8, 16]

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    if a.threads:
        torch.set_num_threads(a.threads)
    n = a.n or (512 if a.quick else (8192 if device.type == "cuda" else 2048))
    runs = 3 if a.quick else a.runs
    ref_runs = max(1, runs // 2)
    dtype = DTYPES[a.dtype]
    torch.manual_seed(a.seed)

    if device.type == "cuda":
        hw = torch.cuda.get_device_name(device)
    else:
        model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                      if ln.startswith("model name")), platform.processor()) \
            if os.path.exists("/proc/cpuinfo") else platform.processor()
        hw = f"{model}, {torch.get_num_threads()} threads"
    print(f"# MCE benchmark: torch {torch.__version__}, {device.type} ({hw}), N={n}, "
          f"logits {a.dtype}, fwd+bwd {a.stat} of {runs} (reference {ref_runs}) "
          f"after {a.warmup} warmup")
    if a.linear:
        linear_main(a, device, dtype, n, runs, ref_runs)
        return
    head = (f"{'V':>7} {'s':>3} | {'plain CE ms':>11} {'fused ms':>9} {'ref ms':>9} | "
            f"{'fused/CE':>8} {'fused/ref':>9} | {'CE MiB':>8} {'fused MiB':>9} {'ref MiB':>9} | "
            f"{'mem fused/CE':>12}")
    print(head)
    print("-" * len(head))
    for vocab in a.vocab:
        z = (torch.randn(n, vocab, device=device) * 2).to(dtype).requires_grad_()
        plain_t = plain_m = None
        for s in a.bag:
            t = torch.randint(0, vocab, (n, s), device=device)
            t[-1, 1:] = -100  # the paper's last latent position: one real target
            sw = slot_weights(s).to(device)
            def plain(x, t=t):
                return F.cross_entropy(x, t[:, 0])

            def fused(x, t=t, sw=sw):
                return multi_hot_cross_entropy(x, t, sw, impl="fused")

            def ref(x, t=t, sw=sw):
                return multi_hot_cross_entropy(x, t, sw, impl="reference")

            if plain_t is None:  # one CE does not depend on s
                plain_t, plain_m = time_it(plain, z, runs, a.warmup, a.stat), peak_bytes(plain, z)
            fused_t, fused_m = time_it(fused, z, runs, a.warmup, a.stat), peak_bytes(fused, z)
            ref_gib = (s + 2) * n * vocab * 4 / 2**30
            if ref_gib <= a.max_ref_gib:
                ref_t, ref_m = time_it(ref, z, ref_runs, a.warmup, a.stat), peak_bytes(ref, z)
                ref_cols = f"{ref_t * 1e3:9.1f}", f"{fused_t / ref_t:9.2f}", f"{ref_m / 2**20:9.0f}"
            else:
                ref_cols = f"{'skip':>9}", f"{'-':>9}", f"{f'~{ref_gib:.0f}G':>9}"
            print(f"{vocab:>7} {s:>3} | {plain_t * 1e3:11.1f} {fused_t * 1e3:9.1f} {ref_cols[0]} | "
                  f"{fused_t / plain_t:8.2f} {ref_cols[1]} | {plain_m / 2**20:8.0f} "
                  f"{fused_m / 2**20:9.0f} {ref_cols[2]} | {fused_m / plain_m:12.2f}", flush=True)
        del z
    sizes = ", ".join(f"V={v}: {n * v * 4 / 2**20:.0f} MiB" for v in a.vocab)
    print(f"# memory = peak allocated above the logits during fwd+bwd, the gradient included; "
          f"one (N, V) fp32 buffer = {sizes}")


if __name__ == "__main__":
    main()
