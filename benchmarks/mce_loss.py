"""Benchmark the multi-hot cross-entropy: fused vs reference (s CE calls) vs one plain CE.

    python benchmarks/mce_loss.py            # CPU, N=2048, V in {32768, 131072}, s in {4, 8, 16}
    python benchmarks/mce_loss.py --quick              # N=512, fewer runs
    python benchmarks/mce_loss.py --device cuda --n 8192 --dtype bfloat16

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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--n", type=int, default=None, help="positions N (default 2048 cpu, 8192 cuda)")
    p.add_argument("--vocab", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--bag", type=int, nargs="+", default=[4, 8, 16])
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
