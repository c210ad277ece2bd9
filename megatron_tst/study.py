"""Equal-FLOPs study: a baseline arm and TST arms over a grid of ``s`` and ``r``, several seeds.

Every run is the real trainer (``megatron-tst train``) on one base recipe, with the same steps,
batch of latent positions, model and schedule; only the ``tst.*`` keys differ between arms (and
the seed between repeats). The learning rate is chosen on the baseline (``--lrs``). Validation is
always the standard next-token loss on the held-out split.

    megatron-tst study configs/demo-cpu.yaml --out runs/study-demo --bag-sizes 2 4 \
        --ratios 0.2 0.4 --seeds 1 2 3 --jobs 2

Writes ``<out>/study.json`` (every validation point of every run), ``<out>/report.md`` (the
table) and ``<out>/loss_vs_flops.png``. Runs already finished under ``<out>/runs`` are reused, so
an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_tst.config import ConfigError, load_config

BASELINE = "baseline"


@dataclass
class Run:
    arm: str
    seed: int
    overrides: list[str]
    run_dir: Path
    valid: list[dict] = field(default_factory=list)  # {"step", "loss", "flops"}
    train: list[dict] = field(default_factory=list)


def arm_name(s: int, r: float) -> str:
    return f"tst-s{s}-r{r:g}"


def tst_overrides(s: int, r: float) -> list[str]:
    return [f"tst.bag_size={s}", f"tst.ratio={r}", "tst.superposition_steps=null"]


BASELINE_OVERRIDES = ["tst.bag_size=1", "tst.ratio=null", "tst.superposition_steps=null"]


# ------------------------------------------------------------------------------------ running
def _launch(recipe: str, run: Run, common: list[str], threads: int) -> None:
    done = run.run_dir / "DONE"
    if done.exists():
        return
    cmd = [sys.executable, "-m", "megatron_tst.cli", "train", recipe, f"run_dir={run.run_dir}",
           f"name={run.arm}-seed{run.seed}", f"seed={run.seed}", "checkpoint.load=none",
           "checkpoint.save_interval=0", "checkpoint.save_final=false", "logging.wandb=false",
           *common, *run.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    run.run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run.run_dir / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()  # a partial run from an interrupted study: start it again
    with open(run.run_dir / "train.log", "w") as log:
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if res.returncode:
        raise RuntimeError(f"run {run.arm} seed {run.seed} failed ({res.returncode}); "
                           f"see {run.run_dir / 'train.log'}")
    done.write_text("ok\n")


def _read(run: Run) -> None:
    with open(run.run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    run.train = [r for r in records if r["kind"] == "train"]
    flops_per_step = run.train[0]["flops"]
    run.valid = [{"step": r["step"], "loss": r["loss"], "flops": r["step"] * flops_per_step}
                 for r in records if r["kind"] == "valid"]


def run_all(recipe: str, runs: list[Run], common: list[str], jobs: int, threads: int) -> None:
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for fut in [pool.submit(_launch, recipe, r, common, threads) for r in runs]:
            fut.result()
    for r in runs:
        _read(r)


# ----------------------------------------------------------------------------------- analysis
def final_loss(run: Run) -> float:
    return run.valid[-1]["loss"]


def mean_curve(runs: list[Run]) -> list[tuple[int, float]]:
    steps = sorted({v["step"] for v in runs[0].valid})
    by_step = [{v["step"]: v["loss"] for v in r.valid} for r in runs]
    return [(s, statistics.fmean(c[s] for c in by_step if s in c)) for s in steps]


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> Optional[float]:
    """First (interpolated) step at which a validation curve reaches ``target``."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None:
                return float(step)
            (s0, l0) = prev
            return s0 + (step - s0) * (l0 - target) / (l0 - loss) if l0 != loss else float(step)
        prev = (step, loss)
    return None


def paired_p_value(a: list[float], b: list[float]) -> Optional[float]:
    """Two-sided paired t-test over seeds (same seeds in both arms); None with < 2 seeds."""
    if len(a) < 2 or len(a) != len(b):
        return None
    diffs = [x - y for x, y in zip(a, b)]
    sd = statistics.stdev(diffs)
    if sd == 0:
        return 0.0 if statistics.fmean(diffs) != 0 else 1.0
    t = statistics.fmean(diffs) / (sd / math.sqrt(len(diffs)))
    from scipy import stats

    return float(2 * stats.t.sf(abs(t), df=len(diffs) - 1))


def corpus_tokens(prefix: str) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # keep it alive: its arrays view a memory map it closes
    return int(dataset.sequence_lengths.sum())


def summarize(arms: dict[str, list[Run]], train_tokens: int, total_steps: int) -> list[dict]:
    base = arms[BASELINE]
    base_final = [final_loss(r) for r in base]
    base_curve = mean_curve(base)
    base_tps = statistics.median(rec["tokens_per_s"] for r in base for rec in r.train[2:])
    rows = []
    for name, runs in arms.items():
        finals = [final_loss(r) for r in runs]
        mean = statistics.fmean(finals)
        row = {
            "arm": name, "seeds": len(runs), "final_loss_mean": mean,
            "final_loss_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "diff_vs_baseline": mean - statistics.fmean(base_final),
            "p_value": None if name == BASELINE else paired_p_value(finals, base_final),
            "data_tokens": runs[0].train[-1]["data_tokens"],
            "epochs": runs[0].train[-1]["data_tokens"] / train_tokens,
            "phase1_tokens_per_s_ratio": None,
            "baseline_steps_to_this_loss": first_step_reaching(base_curve, mean),
            "steps_to_baseline_loss": first_step_reaching(mean_curve(runs),
                                                          statistics.fmean(base_final)),
            "switch_step": max((r["step"] for r in runs[0].train
                                if r["phase"] == "superposition"), default=None),
        }
        sup = [rec["tokens_per_s"] for r in runs for rec in r.train[2:]
               if rec["phase"] == "superposition"]
        if sup:
            row["phase1_tokens_per_s_ratio"] = statistics.median(sup) / base_tps
        rows.append(row)
    for row in rows:
        row["total_steps"] = total_steps
    return rows


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def report_markdown(rows: list[dict], meta: dict) -> str:
    t = meta["total_steps"]
    lines = [
        f"# Equal-FLOPs study: {meta['recipe']}",
        "",
        f"{t} optimizer steps per run, equal FLOPs per step ({meta['flops_per_step']:.3e}); "
        f"learning rate {meta['lr']:g} (chosen on the baseline from {meta['lrs']}); "
        f"seeds {meta['seeds']}; training corpus {meta['train_tokens']:,} tokens. Validation: "
        f"next-token loss on the held-out split. p: two-sided paired t-test over seeds against "
        f"the baseline. Iso-loss: the step at which the baseline's mean curve reaches the arm's "
        f"final loss (as a fraction of {t}: the arm's compute worth in baseline compute, < 1 "
        f"means the arm is behind), and the step at which the arm's mean curve reaches the "
        f"baseline's final loss (if it does, the arm is that many times faster).",
        "",
        "| arm | final loss (mean ± sd) | vs baseline | p | baseline steps to this loss | "
        "arm steps to baseline loss | data tokens | epochs | phase-1 tokens/s vs baseline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["arm"] == BASELINE:
            iso_base = iso_arm = "-"
        else:
            x, y = r["baseline_steps_to_this_loss"], r["steps_to_baseline_loss"]
            iso_base = f"{x:.0f} ({x / t:.2f}x)" if x else "not reached (arm ahead)"
            iso_arm = f"{y:.0f} ({t / y:.2f}x faster)" if y else "not reached"
        lines.append(
            f"| {r['arm']} | {r['final_loss_mean']:.4f} ± {r['final_loss_std']:.4f} | "
            f"{r['diff_vs_baseline']:+.4f} | {_fmt(r['p_value'], '.3g')} | {iso_base} | "
            f"{iso_arm} | {r['data_tokens']:,} | {r['epochs']:.2f} | "
            f"{_fmt(r['phase1_tokens_per_s_ratio'], '.2f')} |")
    return "\n".join(lines) + "\n"


def plot(arms: dict[str, list[Run]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, runs) in enumerate(arms.items()):
        color = f"C{i}"
        flops_per_step = runs[0].train[0]["flops"]
        curve = mean_curve(runs)
        ax.plot([s * flops_per_step for s, _ in curve], [loss for _, loss in curve],
                marker="o", ms=3, color=color, label=f"{name} ({len(runs)} seeds)")
        switch = max((r["step"] for r in runs[0].train if r["phase"] == "superposition"),
                     default=None)
        if switch:
            ax.axvline(switch * flops_per_step, color=color, ls="--", lw=1, alpha=0.7)
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation next-token loss")
    ax.set_title(title + "  (dashed: phase switch)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------- main
def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="the base recipe (its tst: section is replaced per arm)")
    p.add_argument("--out", required=True, help="study directory")
    p.add_argument("--bag-sizes", type=int, nargs="+", default=[4])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="learning rates tried on the baseline (first seed); the best is used "
                        "for every arm. Default: the recipe's optimizer.lr")
    p.add_argument("--eval-points", type=int, default=10, help="validations per run")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side")
    p.add_argument("--threads", type=int, default=0, help="threads per run (0: cores / jobs)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")


def run_study(a: argparse.Namespace) -> int:
    out = Path(a.out)
    cfg = load_config(a.recipe, a.overrides)
    for s in a.bag_sizes:
        if s < 2:
            raise ConfigError("TST arms need a bag size >= 2 (the baseline arm is always run)",
                              key="--bag-sizes", value=s)
    steps = cfg.training.train_steps
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    common = list(a.overrides) + [f"training.eval_interval={max(1, steps // a.eval_points)}"]
    common += _shared_data(cfg, out)
    train_prefix = [c for c in common if c.startswith("data.train_paths=")]
    lr, lr_results = cfg.optimizer.lr, {}
    if a.lrs:
        sweep = [Run(f"lr{lr_:g}", a.seeds[0], [*BASELINE_OVERRIDES, f"optimizer.lr={lr_}"],
                     out / "runs" / "lr-sweep" / f"lr{lr_:g}") for lr_ in a.lrs]
        run_all(a.recipe, sweep, common, a.jobs, threads)
        lr_results = {r.overrides[-1].split("=")[1]: final_loss(r) for r in sweep}
        lr = float(min(lr_results, key=lr_results.get))
        print(f"learning rate sweep on the baseline: {lr_results} -> {lr:g}")
    common.append(f"optimizer.lr={lr}")
    arm_overrides = {BASELINE: BASELINE_OVERRIDES}
    for s in a.bag_sizes:
        for r in a.ratios:
            arm_overrides[arm_name(s, r)] = tst_overrides(s, r)
    arms = {name: [Run(name, seed, ov, out / "runs" / name / f"seed{seed}") for seed in a.seeds]
            for name, ov in arm_overrides.items()}
    if a.lrs:  # the chosen learning rate's sweep run is the baseline's first seed: reuse it
        arms[BASELINE][0].run_dir = out / "runs" / "lr-sweep" / f"lr{lr:g}"
    run_all(a.recipe, [r for runs in arms.values() for r in runs], common, a.jobs, threads)

    train_tokens = corpus_tokens(_resolve_train_prefix(cfg, train_prefix))
    rows = summarize(arms, train_tokens, steps)
    meta = {"recipe": a.recipe, "total_steps": steps, "lr": lr, "lrs": a.lrs or [lr],
            "lr_sweep": lr_results, "seeds": a.seeds, "train_tokens": train_tokens,
            "flops_per_step": arms[BASELINE][0].train[0]["flops"], "overrides": a.overrides}
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({
        "meta": meta, "summary": rows,
        "runs": [{"arm": r.arm, "seed": r.seed, "overrides": r.overrides, "valid": r.valid}
                 for runs in arms.values() for r in runs]}, indent=1))
    report = report_markdown(rows, meta)
    (out / "report.md").write_text(report)
    plot(arms, out / "loss_vs_flops.png", Path(a.recipe).stem)
    print(report)
    print(f"wrote {out / 'report.md'}, {out / 'study.json'}, {out / 'loss_vs_flops.png'}")
    return 0


def _shared_data(cfg, out: Path) -> list[str]:
    """Prepare the demo corpus once for the whole study (runs then read it as indexed data)."""
    if cfg.data.source != "demo":
        return []
    from megatron_tst.data.demo import prepare_demo_data

    demo = prepare_demo_data(out / "data", vocab_size=cfg.data.demo_vocab_size, seed=cfg.seed)
    return ["data.source=indexed", f"data.train_paths=[{demo.train_prefix}]",
            f"data.valid_paths=[{demo.valid_prefix}]", "data.tokenizer.type=sentencepiece",
            f"data.tokenizer.path={demo.tokenizer_path}"]


def _resolve_train_prefix(cfg, train_override: list[str]) -> str:
    if train_override:
        return train_override[0].split("=[", 1)[1].rstrip("]")
    if len(cfg.data.train_paths) != 1:
        raise ConfigError("the study reports epochs for one training dataset; blend them into "
                          "one with preprocess", key="data.train_paths", value=cfg.data.train_paths)
    return cfg.data.train_paths[0]
