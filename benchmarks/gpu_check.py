"""GPU acceptance check: one command, one GPU, a few minutes (docs/benchmarks.md).

    bash scripts/gpu_check.sh                        # inside the GPU image, on one GPU
    bash scripts/gpu_check.sh --quick --json gpu-check.json
    python benchmarks/gpu_check.py --only mce --fp32-tol 1e-5

Prints a table (check, figure, target, PASS / FAIL / SKIP with the reason), writes it as JSON with
``--json PATH`` and exits 1 when a check fails (2 on bad arguments). Nothing is downloaded: the
trainings read the bundled demo corpus, preprocessed here by ``megatron-tst preprocess``; each is a
fresh ``python -m megatron_tst.cli train configs/270m.yaml ...`` (``phase_throughput.run``).

(a) recipe-te, recipe-local, te-vs-local: configs/270m.yaml shrunk to 12 layers, 40 steps of
    which 30 in the superposition phase, bf16, trains through both TST phases with the
    transformer-engine spec and with the local spec; the first losses of each phase must agree
    within --te-rtol.
(b) mce-chunked, mce-triton, mce-triton-time: the chunked fused linear + multi-hot CE against an
    independent float64 PyTorch reference (s cross-entropies), the Triton kernel against the
    chunked path and the reference (loss, dh, dW; fp32 and bf16 tolerances), and the Triton
    kernel's forward+backward time over one plain cross-entropy (logits matmul +
    F.cross_entropy) at V=131072, N=8192, D=2048, bf16.
(c) phase1-throughput, mfu: the median data tokens/s of the TST run's superposition phase over
    a baseline run's (the same recipe with tst.bag_size=1: same model and batch), and the MFU
    of the TST run's two phases.
(d) fp8: the (a) run with model.fp8=hybrid and model.fp8_recipe=tensorwise (mxfp8 on compute
    capability >= 10.0): both phases, finite, first losses close to the bf16 run's.

On a GPU without transformer-engine, (a)'s TE run, te-vs-local and (d) are SKIPped (the
Dockerfile's image has it) and (c) measures the local spec.
Without a CUDA GPU the GPU-only checks are SKIPped (with the reason) and the rest runs at the demo
model's size with single-threaded trainings: (a) with the local spec only, the loss being the
chunked fused linear + MCE (the PyTorch twin of the GPU's Triton kernel); (b) on CPU, the Triton
kernel through TRITON_INTERPRET=1 at a tiny size in a fresh process; (c) with superposition and
recovery (= baseline) steps alternated in one process, against 0.9 x s.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

# NGC images set TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1: every fp32 matmul then runs in TF32 whatever
# torch.backends says. The fp32 loss comparisons of (b) need fp32, so it is dropped here before
# torch reads it; the trainings get the environment as it was (TRAIN_ENV).
TRAIN_ENV = dict(os.environ)
os.environ.pop("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", None)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
import phase_throughput  # noqa: E402  run() and TrainingFailed: the trainings in fresh processes
from megatron_tst.plan import transformer_engine_available  # noqa: E402

IGNORE = -100
GROUPS = ("recipe", "mce", "throughput", "fp8")
# key, item, group, GPU only
CHECKS = (("recipe-te", "a", "recipe", True), ("recipe-local", "a", "recipe", False),
          ("te-vs-local", "a", "recipe", True), ("mce-chunked", "b", "mce", False),
          ("mce-triton", "b", "mce", False), ("mce-triton-time", "b", "mce", True),
          ("phase1-throughput", "c", "throughput", False), ("mfu", "c", "throughput", False),
          ("fp8", "d", "fp8", True))
NO_GPU = "GPU only: no CUDA device here"
TE_ONLY = ("recipe-te", "te-vs-local", "fp8")  # SKIPped where transformer-engine is missing
NO_TE = ("transformer-engine is not importable here (the Dockerfile's image has it); "
         "(c) measures the local spec")


@dataclasses.dataclass
class Check:
    key: str
    item: str
    group: str
    target: str
    status: str = "SKIP"
    figure: str = "-"
    reason: str = "not run"
    data: dict = dataclasses.field(default_factory=dict)

    def result(self, ok: bool, figure: str, why: str = "", **data) -> None:
        self.status, self.figure, self.data = ("PASS" if ok else "FAIL"), figure, data
        self.reason = "" if ok else (why or "outside the target")

    def fail(self, why: str, figure: str = "-") -> None:
        self.status, self.figure, self.reason = "FAIL", figure, why

    def skip(self, why: str, figure: str = "-") -> None:
        self.status, self.figure, self.reason = "SKIP", figure, why


# ------------------------------------------------------------------------------------ (b)
def mce_problem(n: int, v: int, d: int, s: int, seed: int, device: str):
    """Hidden states, LM head and targets (N, s) with ignored slots, duplicates in a bag, one
    token s times, an all-ignored position and the paper's last position (one real target)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * (2.0 / d ** 0.5)
    t = torch.randint(0, v, (n, s), generator=g)
    t[torch.rand(n, s, generator=g) < 0.15] = IGNORE
    if s > 1:
        t[0, :2] = 3  # a duplicate in a bag
        t[1, :] = 7  # one token s times
        t[-1, 1:] = IGNORE
    t[-1, 0] = v - 1  # the last vocabulary column
    t[2, :] = IGNORE
    return h.to(device), w.to(device), t.to(device)


def paper_slot_weights(s: int, weighting: str) -> torch.Tensor:
    """c_k written out from the paper (not the project's ``slot_weights``): 1/s, or 1/k
    normalised."""
    c = torch.ones(s, dtype=torch.float64) if weighting == "uniform" else \
        1.0 / torch.arange(1, s + 1, dtype=torch.float64)
    return c / c.sum()


def reference_mce(h, w, t, weighting: str):
    """The paper's MCE in float64 plain PyTorch: logits materialised, sum_k c_k * (slot k's
    F.cross_entropy, averaged over its non-ignored positions); returns loss, dh, dW."""
    hr = h.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    c = paper_slot_weights(t.shape[1], weighting)
    z = hr @ wr.t()
    loss = sum(c[k] * F.cross_entropy(z, t[:, k], ignore_index=IGNORE)
               for k in range(t.shape[1]))
    loss.backward()
    return loss.detach(), hr.grad, wr.grad


def linear_mce_run(impl: str, h, w, t, weighting: str, dtype: torch.dtype):
    """The project's fused linear + MCE (``loss.implementation`` ``impl``) on ``dtype`` inputs."""
    from megatron_tst.tst.linear_loss import linear_mce
    from megatron_tst.tst.loss import element_weights, slot_weights

    hh = h.detach().to(dtype).requires_grad_()
    ww = w.detach().to(dtype).requires_grad_()
    ew = element_weights(t, slot_weights(t.shape[1], weighting).to(t.device),
                         dtype=torch.promote_types(dtype, torch.float32))
    loss = linear_mce(hh, ww, t, ew, impl=impl, tp_group=None)
    loss.backward()
    return loss.detach().double(), hh.grad.double(), ww.grad.double()


def max_error(got, want) -> float:
    """The largest of max|got - want| / max|want| over loss, dh and dW."""
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
               for a, b in zip(got, want))


MCE_CASES = ((6, "uniform"), (4, "power_law"), (1, "uniform"))  # s=6: the 270m recipe's


def mce_errors(impls: tuple[str, ...], n: int, v: int, d: int, device: str) -> dict:
    """Max errors per dtype: each impl vs the float64 reference, and triton vs chunked."""
    out: dict[str, float] = {}
    for i, (s, weighting) in enumerate(MCE_CASES):
        h, w, t = mce_problem(n, v, d, s, seed=10 + i, device=device)
        ref = reference_mce(h, w, t, weighting)
        for dt_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            got = {impl: linear_mce_run(impl, h, w, t, weighting, dtype) for impl in impls}
            for impl, res in got.items():
                key = f"{impl}-vs-ref-{dt_name}"
                out[key] = max(out.get(key, 0.0), max_error(res, ref))
            if "triton" in got and "chunked" in got:
                key = f"triton-vs-chunked-{dt_name}"
                out[key] = max(out.get(key, 0.0), max_error(got["triton"], got["chunked"]))
    return out


INTERP_SIZE = (37, 70, 24)  # N, V, D: ragged against the interpreter's 16 x 32 x 16 blocks


def triton_interpreted(timeout: float) -> dict:
    """``mce_errors`` for chunked and triton under TRITON_INTERPRET=1, in a fresh process (the
    variable must be set before Triton is first imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__, "--interpreter-worker"], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the interpreter process failed: {tail}")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def check_mce(a, gpu: bool, checks: dict[str, Check]) -> None:
    have_triton = importlib.util.find_spec("triton") is not None
    tol = {"fp32": a.fp32_tol, "bf16": a.bf16_tol}

    def verdict(errors: dict, prefix: str) -> tuple[str, str]:
        """(the figure, what misses its tolerance: "" when nothing does)."""
        err = {dt: errors[f"{prefix}-{dt}"] for dt in ("fp32", "bf16")}
        return (", ".join(f"{dt} {e:.1e}" for dt, e in err.items()),
                "; ".join(f"{dt} {e:.1e} > {tol[dt]:g}" for dt, e in err.items() if e > tol[dt]))

    if gpu:  # GPU: the kernels at a mid size, ragged against every block size
        torch.set_float32_matmul_precision("highest")  # fp32 means fp32 here (no TF32)
        n, v, d, where = 1000, 50_257, 512, "cuda"
        impls = ("chunked", "triton") if have_triton else ("chunked",)
        errors = mce_errors(impls, n, v, d, "cuda")
    else:
        n, v, d, where = 96, 1000, 48, "cpu"
        errors = mce_errors(("chunked",), n, v, d, "cpu")
    size = f"N={n} V={v} D={d}, s=6, 4 power law, 1; {where}"
    fig, why = verdict(errors, "chunked-vs-ref")
    checks["mce-chunked"].result(not why, f"{fig} ({size})", why, **errors)

    c = checks["mce-triton"]

    def triton_result(errors: dict, where: str) -> None:
        (fig, why), (fig_ref, why_ref) = (verdict(errors, "triton-vs-chunked"),
                                          verdict(errors, "triton-vs-ref"))
        misses = "; ".join(x for x in (why and f"vs chunked {why}", why_ref and f"vs ref {why_ref}")
                           if x)
        c.result(not misses, f"vs chunked {fig}; vs ref {fig_ref} ({where})", misses, **errors)

    if not have_triton:
        (c.fail if gpu else c.skip)("triton is not installed")
    elif gpu:
        triton_result(errors, size)
    else:
        try:
            interp = triton_interpreted(a.train_timeout)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as err:
            c.fail(str(err).splitlines()[0])
        else:
            triton_result(interp, "TRITON_INTERPRET=1, N={} V={} D={}".format(*INTERP_SIZE))

    if gpu:  # on CPU, SKIPped already (main)
        t = checks["mce-triton-time"]
        triton_time(a, t) if have_triton else t.fail("triton is not installed")
        torch.cuda.empty_cache()  # the trainings that follow need the memory


def triton_time(a, c: Check) -> None:
    """GPU: Triton fused linear + MCE vs one plain CE, forward+backward, bf16 (s=6 and s=1)."""
    import mce_loss  # linear_time, linear_peak: the --linear benchmark's timing and memory

    from megatron_tst.tst.linear_loss import linear_mce
    from megatron_tst.tst.loss import element_weights, slot_weights

    n, v, d = 8192, 131_072, 2048
    torch.manual_seed(0)
    h = (torch.randn(n, d, device="cuda") / d ** 0.25).bfloat16().requires_grad_()
    w = (torch.randn(v, d, device="cuda") / d ** 0.25).bfloat16().requires_grad_()
    t6 = torch.randint(0, v, (n, 6), device="cuda")
    t6[-1, 1:] = IGNORE
    ew6 = element_weights(t6, slot_weights(6).cuda())
    t1, ew1 = t6[:, :1].contiguous(), element_weights(t6[:, :1], slot_weights(1).cuda())
    fns = {"plain CE": lambda: F.cross_entropy((h @ w.t()).float(), t6[:, 0]),
           "triton s=6": lambda: linear_mce(h, w, t6, ew6, impl="triton"),
           "triton s=1": lambda: linear_mce(h, w, t1, ew1, impl="triton")}
    runs, warmup = (5, 2) if a.quick else (10, 3)
    ms = {k: 1e3 * mce_loss.linear_time(f, [h, w], runs, warmup) for k, f in fns.items()}
    gib = {k: mce_loss.linear_peak(f, [h, w]) / 2**30 for k, f in fns.items()}
    ratio = max(ms["triton s=6"], ms["triton s=1"]) / ms["plain CE"]
    figure = (f"{ratio:.2f}x (s=6 {ms['triton s=6']:.1f} ms, s=1 {ms['triton s=1']:.1f} ms, "
              f"CE {ms['plain CE']:.1f} ms; peak {gib['triton s=6']:.2f} vs "
              f"{gib['plain CE']:.2f} GiB)")
    c.result(ratio <= a.max_ce_ratio, figure, f"{ratio:.2f}x > {a.max_ce_ratio:g}x", ratio=ratio,
             ms=ms, peak_gib=gib)


# ------------------------------------------------------------------------ (a), (c), (d)
def schedule(a) -> tuple[int, int]:
    """(train_steps, superposition steps) of the check runs."""
    return (24, 16) if a.quick else (40, 30)


def recipe_overrides(a, gpu: bool, prefix: str, tokenizer: str) -> list[str]:
    """configs/270m.yaml shrunk for the check, on the preprocessed demo corpus."""
    steps, p1 = schedule(a)
    data = [f"data.train_paths=[{prefix}]", "data.train_weights=null",
            f"data.valid_paths=[{prefix}]", "data.tokenizer.type=sentencepiece",
            f"data.tokenizer.path={tokenizer}", "data.tokenizer.eod_token=null"]
    run = [f"training.train_steps={steps}", "tst.ratio=null", f"tst.superposition_steps={p1}",
           f"schedule.warmup_steps={p1 // 2}", "schedule.decay_fraction=0",
           "training.log_interval=5", "logging.tensorboard=false"]
    if gpu:  # the 270m model at 12 of its 30 layers; 128k vocabulary, 8 x 2048 positions
        size = ["model.num_layers=12", "training.micro_batch_size=8",
                "training.global_batch_size=8"]
    else:  # the demo model's size (configs/demo-cpu.yaml), fp32, 16 x 128 positions. The loss:
        # the chunked fused linear + MCE, the PyTorch twin of the Triton kernel that `auto` picks
        # on a GPU, so both runs have the GPU's LM-head path (CPU's `auto` is the fused MCE on
        # logits for TST and megatron's CE for the baseline: two different losses)
        size = ["model.num_layers=4", "model.hidden_size=128", "model.num_attention_heads=4",
                "model.num_query_groups=2", "model.ffn_hidden_size=352",
                "model.seq_length=128", "model.vocab_size=null", "model.params_dtype=float32",
                "training.micro_batch_size=16", "training.global_batch_size=16",
                "data.num_workers=0", "loss.implementation=chunked"]
    return [*size, *data, *run]


class Runs:
    """The check's trainings by name, each run once on first use, in a fresh process: the
    transformer-engine and local specs through both phases, the baseline (tst.bag_size=1, as
    many steps as phase 1 has; GPU) on the spec (c) measures, and the FP8 runs."""

    def __init__(self, a, work: Path, common: list[str], main_impl: str, env: dict):
        self.a, self.work, self.common, self.env = a, work, common, env
        _, p1 = schedule(a)
        self.overrides = {
            "transformer_engine": ["model.transformer_impl=transformer_engine"],
            "local": ["model.transformer_impl=local"],
            "baseline": [f"model.transformer_impl={main_impl}", "tst.bag_size=1",
                         "tst.superposition_steps=null", f"training.train_steps={p1}"],
            **{f"fp8-{r}": ["model.transformer_impl=transformer_engine", "model.fp8=hybrid",
                            f"model.fp8_recipe={r}"] for r in ("tensorwise", "mxfp8")}}
        self.done: dict[str, list[dict] | Exception] = {}

    def __getitem__(self, name: str) -> list[dict]:
        """The run's per-step records; raises its ``TrainingFailed`` (again) if it failed."""
        if name not in self.done:
            tic = time.time()
            try:
                self.done[name] = phase_throughput.run(
                    str(REPO / "configs" / "270m.yaml"), self.work / name,
                    [*self.common, *self.overrides[name]], env=self.env,
                    timeout=self.a.train_timeout)
            except phase_throughput.TrainingFailed as err:
                print(str(err), file=sys.stderr)  # the command and its output's tail
                self.done[name] = phase_throughput.TrainingFailed(
                    f"training '{name}': {_failure(err)}")
            _say(f"training '{name}': {time.time() - tic:.0f} s")
        out = self.done[name]
        if isinstance(out, Exception):
            raise out
        return out


def _say(message: str) -> None:
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


def _failure(err: Exception | str) -> str:
    """One line for the table: the last line of a failed training's output (or message)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def phase_losses(records: list[dict], phase: str) -> list[float]:
    return [r["loss"] for r in records if r["phase"] == phase]


def through_both_phases(records: list[dict], a) -> tuple[bool, str, str]:
    """Both phases ran for their steps, every loss finite, the phase-1 loss falls."""
    steps, p1 = schedule(a)
    sup, rec = phase_losses(records, "superposition"), phase_losses(records, "recovery")
    losses = sup + rec
    finite = all(x is not None and math.isfinite(x) for x in losses)
    figure = (f"{len(sup)}+{len(rec)} steps; loss {sup[0]:.3f}->{sup[-1]:.3f} | "
              f"{rec[0]:.3f}->{rec[-1]:.3f}") if sup and rec else f"{len(losses)} steps"
    why = ("a loss is not finite" if not finite else
           f"expected {p1}+{steps - p1} steps" if (len(sup), len(rec)) != (p1, steps - p1) else
           "the phase-1 loss did not fall" if sup[-1] >= sup[0] else "")
    return not why, figure, why


def first_loss_gap(got: list[dict], ref: list[dict], k: int) -> tuple[float, str, dict]:
    """Max |got - ref| / |ref| over the first k losses of each phase, a figure, and the losses
    compared (for the JSON)."""
    gaps, compared = [], {}
    for phase in ("superposition", "recovery"):
        pairs = list(zip(phase_losses(got, phase), phase_losses(ref, phase)))[:k]
        compared[phase] = pairs
        gaps += [abs(x - y) / abs(y) if math.isfinite(x) else math.inf for x, y in pairs]
    if not gaps:
        return math.inf, "no losses to compare", compared
    return (max(gaps), f"max rel. diff {max(gaps):.2%} over the first {k} losses of each phase",
            compared)


def check_trainings(a, gpu: bool, groups: set[str], checks: dict[str, Check],
                    work: Path) -> None:
    """(a), (c), (d). On CPU the GPU-only checks are SKIPped already (main)."""
    tic = time.time()
    try:
        prefix, tokenizer = phase_throughput.prepare_demo_data(
            work, every=5 if a.quick else 1, env=TRAIN_ENV, timeout=a.train_timeout)
    except (RuntimeError, ImportError, subprocess.TimeoutExpired) as err:
        for c in checks.values():
            if c.group in groups - {"mce"} and c.reason != NO_GPU:
                c.fail(f"data: {str(err).splitlines()[0]}")
        return
    _say(f"demo corpus preprocessed: {time.time() - tic:.0f} s")
    te = gpu and transformer_engine_available()
    main_impl = "transformer_engine" if te else "local"  # the spec (c) and (d) measure
    # CPU: one thread per training, so that the other jobs of a shared host disturb its steps
    # less (a multi-threaded step waits for its slowest thread)
    env = TRAIN_ENV if gpu else {**TRAIN_ENV, "OMP_NUM_THREADS": "1"}
    runs = Runs(a, work, recipe_overrides(a, gpu, prefix, tokenizer), main_impl, env)

    if "recipe" in groups:
        for impl, key in (("transformer_engine", "recipe-te"), ("local", "recipe-local")):
            if te or impl == main_impl:
                try:
                    checks[key].result(*through_both_phases(runs[impl], a))
                except phase_throughput.TrainingFailed as err:
                    checks[key].fail(_failure(err))
        if te:
            c = checks["te-vs-local"]
            if checks["recipe-te"].status == checks["recipe-local"].status == "PASS":
                gap, figure, losses = first_loss_gap(runs["transformer_engine"], runs["local"],
                                                     a.compare_steps)
                c.result(gap <= a.te_rtol, figure, f"{gap:.2%} > {a.te_rtol:.0%}", gap=gap,
                         losses_te_local=losses)
            else:
                c.fail("needs both recipe runs (recipe-te, recipe-local) to pass")

    if "throughput" in groups:
        try:
            check_throughput(a, gpu, runs, main_impl, checks)
        except phase_throughput.TrainingFailed as err:
            for key in ("phase1-throughput", "mfu"):
                checks[key].fail(_failure(err))

    if "fp8" in groups and te:
        check_fp8(a, runs, checks["fp8"])


def check_throughput(a, gpu: bool, runs: Runs, main_impl: str,
                     checks: dict[str, Check]) -> None:
    """(c) phase-1 data tokens/s over the baseline's, same model and batch, after a warm-up.
    GPU: the median steps of the TST run's phase 1 and of the baseline run. CPU: phase-1 and
    recovery steps alternated in one process (``interleaved``); MFU: the TST run's phases."""
    skip = 3 if a.quick else 5
    tst = runs[main_impl]
    p1 = [r for r in tst if r["phase"] == "superposition"][skip:]
    rec = [r for r in tst if r["phase"] == "recovery"]
    if not p1 or not rec:
        for key in ("phase1-throughput", "mfu"):
            checks[key].fail("too few steps after the warm-up")
        return
    s = p1[0]["bag_size"]
    c = checks["phase1-throughput"]
    if gpu:
        base = runs["baseline"][skip:]
        t_tok = statistics.median(r["tokens_per_s"] for r in p1)
        b_tok = statistics.median(r["tokens_per_s"] for r in base)
        ratio = t_tok / b_tok
        figure = (f"{ratio:.2f} = {ratio / s:.3f} x s (s={s}; {t_tok:,.0f} vs {b_tok:,.0f} data "
                  f"tokens/s, medians of {len(p1)} / {len(base)} steps)")
        data = dict(tst_tokens_per_s=t_tok, baseline_tokens_per_s=b_tok)
    else:
        times = interleaved(a, runs, main_impl)
        sup, base = times["superposition"][skip:], times["recovery"][skip:]
        ratio = s * statistics.median(b / t for t, b in zip(sup, base))
        figure = (f"{ratio:.2f} = {ratio / s:.3f} x s (s={s}; median of {len(sup)} alternated "
                  f"pairs of steps, {statistics.median(sup):.3f} vs "
                  f"{statistics.median(base):.3f} s per step)")
        data = dict(step_times=times)
    c.result(ratio >= a.min_throughput * s, figure,
             f"{ratio / s:.3f} x s < {a.min_throughput:g} x s", ratio=ratio,
             ratio_over_s=ratio / s, **data)

    c = checks["mfu"]
    if not any("mfu" in r for r in p1 + rec):
        c.skip("n/a: metrics.jsonl has no mfu field (this trainer does not report it)")
        return

    def med(records, key):
        vals = [r.get(key) for r in records if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    tf = {"superposition": med(p1, "tflops_per_gpu"), "recovery": med(rec, "tflops_per_gpu")}
    mfu = {"superposition": med(p1, "mfu"), "recovery": med(rec, "mfu")}
    tf_text = ", ".join(f"{k} {v:.3g}" for k, v in tf.items() if v is not None)
    if mfu["superposition"] is None or mfu["recovery"] is None:
        c.skip("n/a: mfu is null (no peak FLOP/s for this device; logging.peak_tflops sets one)",
               f"TFLOP/s/GPU: {tf_text or 'n/a'}")
        return
    c.result(True, f"superposition {mfu['superposition']:.1%}, recovery {mfu['recovery']:.1%} "
                   f"(TFLOP/s/GPU: {tf_text})", mfu=mfu, tflops_per_gpu=tf)


def interleaved(a, runs: Runs, impl: str) -> dict:
    """CPU (c): the TST run's trainer in a fresh process with its superposition-phase and
    recovery-phase steps alternated (``--interleaved-worker``). A recovery step is a baseline
    step of the same model and batch; alternating them makes a shared host's slow spells, which
    last seconds, hit both alike (two separate runs measured 0.84-1.18 x s back to back)."""
    tic = time.time()
    spec = {"recipe": str(REPO / "configs" / "270m.yaml"), "steps": 16 if a.quick else 30,
            "overrides": [f"run_dir={runs.work / 'interleaved'}", *phase_throughput.RUN_OVERRIDES,
                          *runs.common, *runs.overrides[impl]]}
    try:
        proc = subprocess.run([sys.executable, __file__, "--interleaved-worker", json.dumps(spec)],
                              env={**runs.env, "WANDB_MODE": "disabled"}, cwd=REPO,
                              capture_output=True, text=True, timeout=a.train_timeout)
    except subprocess.TimeoutExpired as err:
        raise phase_throughput.TrainingFailed(
            f"interleaved steps: did not finish within {a.train_timeout:.0f} s") from err
    _say(f"interleaved phase-1 / recovery steps: {time.time() - tic:.0f} s")
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise phase_throughput.TrainingFailed(f"interleaved steps: {_failure(proc.stderr)} "
                                              f"(exit {proc.returncode})")
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


def interleaved_worker(spec: dict) -> dict:
    """In the fresh process: build the trainer as ``megatron-tst train`` does and alternate
    ``steps`` superposition and recovery steps (the order flips every pair); their times."""
    from megatron_tst.config import load_config
    from megatron_tst.data.build import check_run_data
    from megatron_tst.plan import RunPlan
    from megatron_tst.training.distributed import destroy_distributed
    from megatron_tst.training.trainer import Trainer

    cfg = load_config(spec["recipe"], spec["overrides"])
    plan = RunPlan.build(cfg, 1)
    check_run_data(cfg, plan.stream)
    trainer = Trainer(cfg, plan)
    try:
        sched, n = trainer.schedule, spec["steps"]
        phases = [sched.phase(0), sched.phase(sched.superposition_steps)]
        batches = [trainer._batches(trainer.data.train, p, 0, n) for p in phases]
        times: list[list[float]] = [[], []]
        for i in range(n):
            for k in ((0, 1) if i % 2 == 0 else (1, 0)):
                tic = time.perf_counter()
                trainer.train_step(phases[k], batches[k])
                times[k].append(time.perf_counter() - tic)
    finally:
        destroy_distributed()
    return {"superposition": times[0], "recovery": times[1]}


def fp8_recipe() -> tuple[str | None, str]:
    """GPU: (model.fp8_recipe to test, why) from the compute capability; None = no FP8 here."""
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) >= (10, 0):
        return "mxfp8", f"compute capability {major}.{minor}"
    if (major, minor) >= (8, 9):
        return "tensorwise", f"compute capability {major}.{minor}"
    return None, f"compute capability {major}.{minor} < 8.9 has no FP8 tensor cores"


def check_fp8(a, runs: Runs, c: Check) -> None:
    """(d), GPU only: model.fp8=hybrid with the recipe the GPU supports, against the bf16 run."""
    from megatron_tst.config.schema import ModelConfig

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if not {"fp8", "fp8_recipe"} <= fields:
        c.skip("this checkout's recipes have no model.fp8 / model.fp8_recipe keys")
        return
    recipe, why = fp8_recipe()
    if recipe is None:
        c.skip(why)
        return
    c.target = f"hybrid/{recipe} ({why}): {c.target}"
    try:
        bf16, fp8 = runs["transformer_engine"], runs[f"fp8-{recipe}"]
    except phase_throughput.TrainingFailed as err:
        c.fail(_failure(err))
        return
    ok, figure, why = through_both_phases(fp8, a)
    gap, gap_text, losses = first_loss_gap(fp8, bf16, a.compare_steps)
    c.result(ok and gap <= a.fp8_rtol, f"{gap_text}; {figure}",
             why or f"{gap:.2%} > {a.fp8_rtol:.0%}", gap=gap, fp8_recipe=recipe,
             losses_fp8_bf16=losses)


# --------------------------------------------------------------------------------- main
def targets(a) -> dict[str, str]:
    return {
        "recipe-te": "both phases, finite losses, phase-1 loss falls",
        "recipe-local": "both phases, finite losses, phase-1 loss falls",
        "te-vs-local": f"first losses within {a.te_rtol:.0%} (bf16 TE vs local kernels)",
        "mce-chunked": f"vs float64 ref: fp32 <= {a.fp32_tol:g}, bf16 <= {a.bf16_tol:g}",
        "mce-triton": f"vs chunked and ref: fp32 <= {a.fp32_tol:g}, bf16 <= {a.bf16_tol:g}",
        "mce-triton-time": f"<= {a.max_ce_ratio:g}x one plain CE (V=128k N=8192 D=2048 bf16)",
        "phase1-throughput": f">= {a.min_throughput:g} x s",
        "mfu": "reported (no target)",
        "fp8": f"finite, first losses within {a.fp8_rtol:.0%} of bf16",
    }


def _version(dist: str) -> str | None:
    for name in (dist, dist.replace("_", "-")):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return None


def environment() -> dict:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        device = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    else:
        device = f"CPU only ({platform.machine()}, {os.cpu_count()} cores)"
    return {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "megatron-core": _version("megatron-core"),
            "transformer-engine": _version("transformer_engine"),
            "triton": _version("triton") or _version("pytorch-triton")}


def print_table(checks: list[Check], env: dict, wall_s: float) -> None:
    print(f"\nGPU acceptance check: {env['device']}")
    print("  " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device" and v) +
          f"; {wall_s:.0f} s")
    rows = [("check", "figure", "target", "result")] + [
        (f"({c.item}) {c.key}", c.figure, c.target,
         c.status + (f": {c.reason}" if c.status != "PASS" else "")) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, r in enumerate(rows):
        print("  ".join(x.ljust(wd) for x, wd in zip(r[:3], widths)) + "  " + r[3])
        if i == 0:
            print("-" * (sum(widths) + 6 + max(len(r[3]) for r in rows)))
    failed = [c.key for c in checks if c.status == "FAIL"]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks that ran passed'}"
          f" ({sum(c.status == 'PASS' for c in checks)} passed, {len(failed)} failed, "
          f"{sum(c.status == 'SKIP' for c in checks)} skipped)")


def guarded(fn, checks: dict[str, Check], groups: set[str], *args) -> None:
    """Run ``fn``; an unexpected error FAILs the checks of ``groups`` it had not decided yet
    (traceback on stderr) instead of ending the whole check."""
    try:
        fn(*args)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        first = (str(err).strip().splitlines() or [""])[0]
        for c in checks.values():
            if c.group in groups and c.reason == "not run":
                c.fail(f"{type(err).__name__}: {first}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="shorter trainings (24 steps, 16 in phase 1; default 40, 30), a fifth of "
                        "the demo corpus and fewer timed runs")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON to PATH")
    p.add_argument("--only", nargs="+", choices=GROUPS, metavar="GROUP",
                   help=f"run only these groups of checks ({', '.join(GROUPS)}); the others are "
                        "listed as SKIP")
    p.add_argument("--work-dir", metavar="DIR",
                   help="keep the data and the runs' directories here (default: a temporary "
                        "directory, removed at the end)")
    p.add_argument("--te-rtol", type=float, default=0.02,
                   help="(a) max relative difference of the first losses, TE vs local (0.02)")
    p.add_argument("--compare-steps", type=int, default=5,
                   help="(a), (d) first losses compared in each phase (5)")
    p.add_argument("--fp32-tol", type=float, default=1e-4,
                   help="(b) max error relative to max |reference|, fp32 inputs (1e-4)")
    p.add_argument("--bf16-tol", type=float, default=3e-2,
                   help="(b) the same for bf16 inputs (3e-2)")
    p.add_argument("--max-ce-ratio", type=float, default=1.3,
                   help="(b) Triton fwd+bwd time over one plain CE's, at most (1.3)")
    p.add_argument("--min-throughput", type=float, default=None,
                   help="(c) phase-1 data tokens/s over the baseline's, at least this x s "
                        "(0.95 on a GPU; 0.9 on CPU, benchmarks/phase_throughput.py's target: "
                        "at the demo size the per-step costs that grow with s, reading s times "
                        "the data and s embedding lookups, are a larger share of a step)")
    p.add_argument("--fp8-rtol", type=float, default=0.03,
                   help="(d) max relative difference of the first losses, FP8 vs bf16 (0.03)")
    p.add_argument("--train-timeout", type=float, default=300,
                   help="seconds one training (or the preprocessing) may take (300)")
    p.add_argument("--interpreter-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--interleaved-worker", metavar="SPEC", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.compare_steps < 1:
        p.error("--compare-steps must be at least 1")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.interpreter_worker:  # (b) on CPU, in the fresh process triton_interpreted starts
        torch.set_num_threads(1)
        print(json.dumps(mce_errors(("chunked", "triton"), *INTERP_SIZE, "cpu")))
        return 0
    if a.interleaved_worker:  # (c) on CPU, in the fresh process interleaved starts
        print(json.dumps(interleaved_worker(json.loads(a.interleaved_worker))))
        return 0
    tic = time.time()
    gpu = torch.cuda.is_available()
    if a.min_throughput is None:
        a.min_throughput = 0.95 if gpu else 0.9
    env = environment()
    tgt = targets(a)
    checks = {key: Check(key, item, group, tgt[key]) for key, item, group, _ in CHECKS}
    groups = set(a.only or GROUPS)
    for key, _, group, gpu_only in CHECKS:
        if group not in groups:
            checks[key].skip("not selected (--only)")
        elif gpu_only and not gpu:
            checks[key].skip(NO_GPU)
        elif key in TE_ONLY and not transformer_engine_available():
            checks[key].skip(NO_TE)
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if "mce" in groups:
            guarded(check_mce, checks, {"mce"}, a, gpu, checks)
        if any(c.group != "mce" and c.reason == "not run" for c in checks.values()):
            guarded(check_trainings, checks, groups - {"mce"}, a, gpu, groups, checks, work)
    finally:
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    for c in checks.values():
        if c.reason == "not run":  # every path decides; this would be a bug here
            c.fail("not decided (a bug in benchmarks/gpu_check.py)")
    wall = time.time() - tic
    ordered = list(checks.values())
    print_table(ordered, env, wall)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(
            {"environment": env, "quick": a.quick, "wall_s": wall,
             "passed": not any(c.status == "FAIL" for c in ordered),
             "checks": [dataclasses.asdict(c) for c in ordered]}, indent=2) + "\n")
    return 1 if any(c.status == "FAIL" for c in ordered) else 0


if __name__ == "__main__":
    sys.exit(main())
