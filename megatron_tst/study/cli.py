"""``megatron-tst study``: its arguments, the runs they ask for, and the outputs."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

from megatron_tst.config import ConfigError, load_config

from .report import plot_gap, plot_loss, report_markdown
from .runs import (BASELINE, BASELINE_OVERRIDES, Launcher, Run, arm_name, finished_runs,
                   read_run, run_all, run_dir, sweep_dir, tst_overrides)
from .stats import analyze


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="the base recipe (its tst: section is replaced per arm)")
    p.add_argument("--out", required=True, help="study directory")
    p.add_argument("--arms", nargs="+", metavar="s=S,r=R", default=None,
                   help="the TST arms, e.g. s=2,r=0.3 s=4,r=0.2 (instead of the grid of "
                        "--bag-sizes x --ratios); the baseline always runs")
    p.add_argument("--bag-sizes", type=int, nargs="+", default=None, help="grid (default 4)")
    p.add_argument("--ratios", type=float, nargs="+", default=None, help="grid (default 0.3)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="run lengths: every arm and seed at each, with its own full schedule "
                        "(default: the recipe's training.train_steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="learning rates tried on the baseline (first seed, at --lr-steps); "
                        "the best final loss is used for every arm. Default: optimizer.lr")
    p.add_argument("--lr-steps", type=int, default=None,
                   help="run length of the learning-rate sweep (default: the shortest of "
                        "--steps); give an earlier invocation's (with its first seed and --lrs) "
                        "to reuse that sweep, e.g. when adding seeds at one length")
    p.add_argument("--eval-tokens", type=int, default=None,
                   help="final evaluation on the first N tokens of the held-out data "
                        "(default: all of it)")
    p.add_argument("--eval-points", type=int, default=10, help="in-training validations per run")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side")
    p.add_argument("--threads", type=int, default=0, help="threads per run (0: cores / jobs)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the runs finished so far; start none (e.g. while "
                        "another invocation trains)")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")


def parse_arm(spec: str) -> tuple[int, float]:
    """``s=2,r=0.3`` -> (2, 0.3), or a ConfigError naming the fix."""
    fix = "write each arm as s=BAG_SIZE,r=RATIO, e.g. --arms s=2,r=0.3 s=4,r=0.2"
    try:
        kv = dict(item.split("=", 1) for item in spec.split(","))
        s, r = int(kv.pop("s")), float(kv.pop("r"))
    except (ValueError, KeyError):
        raise ConfigError(f"cannot read the arm {spec!r}: {fix}", key="--arms", value=spec) \
            from None
    if kv:
        raise ConfigError(f"unknown keys {sorted(kv)} in the arm {spec!r}: {fix}",
                          key="--arms", value=spec)
    if s < 2:
        raise ConfigError(f"a TST arm needs s >= 2 (the baseline always runs): {spec!r}",
                          key="--arms", value=spec)
    if not 0 < r < 1:
        raise ConfigError(f"r is the superposition fraction of the steps, in (0, 1): {spec!r}",
                          key="--arms", value=spec)
    return s, r


def requested_arms(a: argparse.Namespace) -> dict[str, list[str]]:
    arms = {BASELINE: BASELINE_OVERRIDES}
    if a.arms is not None:
        if a.bag_sizes or a.ratios:
            raise ConfigError("give the arms either with --arms or as the grid --bag-sizes x "
                              "--ratios, not both", key="--arms", value=a.arms)
        pairs = [parse_arm(spec) for spec in a.arms]
    else:
        for s in a.bag_sizes or []:
            if s < 2:
                raise ConfigError("TST arms need a bag size >= 2 (the baseline arm is always "
                                  "run)", key="--bag-sizes", value=s)
        pairs = [(s, r) for s in a.bag_sizes or [4] for r in a.ratios or [0.3]]
    for s, r in pairs:
        arms[arm_name(s, r)] = tst_overrides(s, r)
    return arms


def _valid_prefix(cfg, shared: list[str]) -> str:
    """The one held-out indexed dataset every final evaluation reads."""
    paths = [c.split("=[", 1)[1].rstrip("]") for c in shared if c.startswith("data.valid_paths=")]
    paths = paths or list(cfg.data.valid_paths)
    if len(paths) != 1 or not Path(paths[0] + ".idx").is_file():
        raise ConfigError("the study evaluates every run on one held-out indexed dataset: give "
                          "data.valid_paths one prefix (PATH of PATH.bin / PATH.idx)",
                          key="data.valid_paths", value=paths)
    return paths[0]


def run_study(a: argparse.Namespace) -> int:
    out = Path(a.out)
    cfg = load_config(a.recipe, a.overrides)
    arms = requested_arms(a)
    lengths = sorted(set(a.steps or [cfg.training.train_steps]))
    lr_steps = lengths[0] if a.lr_steps is None else a.lr_steps
    for key, n in [*(("--steps", n) for n in lengths), ("--lr-steps", lr_steps)]:
        if n <= cfg.schedule.warmup_steps:
            raise ConfigError(f"a run of {n} steps is not longer than the warmup "
                              f"(schedule.warmup_steps={cfg.schedule.warmup_steps})",
                              key=key, value=n)
    if a.lr_steps is not None and not a.lrs:
        raise ConfigError("--lr-steps is the length of the learning-rate sweep: give the rates "
                          "with --lrs too", key="--lr-steps", value=a.lr_steps)
    if a.eval_tokens is not None and a.eval_tokens < cfg.model.seq_length + 1:
        raise ConfigError(f"must be at least one window of model.seq_length + 1 = "
                          f"{cfg.model.seq_length + 1} tokens", key="--eval-tokens",
                          value=a.eval_tokens)
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    shared = _shared_data(cfg, out)
    launcher = Launcher(a.recipe, _valid_prefix(cfg, shared), a.eval_tokens, threads)

    def common_for(steps: int, lr: float) -> list[str]:
        """The overrides every run of ``steps`` steps shares."""
        return [*a.overrides, *shared, f"training.train_steps={steps}",
                f"training.eval_interval={max(1, steps // a.eval_points)}", f"optimizer.lr={lr}"]

    lr, lr_results = cfg.optimizer.lr, {}
    if a.lrs:
        lr, lr_results = _sweep_learning_rate(a, launcher, out, lr_steps, common_for)
    runs = []
    for steps in lengths:
        for name, ov in arms.items():
            for seed in a.seeds:
                d = run_dir(out, steps, name, seed)
                if a.lrs and name == BASELINE and seed == a.seeds[0] and steps == lr_steps:
                    d = sweep_dir(out, steps, lr)  # the sweep's run at the chosen rate
                runs.append(Run(name, seed, steps, ov, common_for(steps, lr), d))
    run_all(launcher, runs, a.jobs, start=not a.report_only)

    found, skipped = finished_runs(out, a.recipe, lambda steps: common_for(steps, lr))
    for why in skipped:
        print(f"not in the report: {why}")
    records = [read_run(r).to_json() for r in found]
    if not records:
        raise ConfigError(f"no finished run in {out / 'runs'} to report", key="--out",
                          value=str(out))
    train_tokens = _corpus_tokens(cfg, shared)
    meta = {"recipe": a.recipe, "lengths": sorted({r["steps"] for r in records}),
            "lr": lr, "lrs": a.lrs or [lr], "lr_steps": lr_steps,
            "lr_sweep": lr_results, "train_tokens": train_tokens, "overrides": a.overrides,
            "valid_prefix": launcher.valid_prefix, "eval_tokens": records[0]["eval_tokens"],
            "eval_what": (f"first {a.eval_tokens:,} tokens of {launcher.valid_prefix}"
                          if a.eval_tokens else f"held-out set {launcher.valid_prefix} "
                          f"({records[0]['eval_tokens']:,} tokens)")}
    _write_outputs(out, records, analyze(records, train_tokens), meta, Path(a.recipe).stem)
    return 0


def _sweep_learning_rate(a, launcher: Launcher, out: Path, steps: int,
                         common_for) -> tuple[float, dict]:
    """(the rate with the best final loss, {rate: final loss}) of the baseline's first seed."""
    sweep = [Run(BASELINE, a.seeds[0], steps, BASELINE_OVERRIDES, common_for(steps, lr),
                 sweep_dir(out, steps, lr)) for lr in a.lrs]
    if a.report_only:
        unfinished = [r.run_dir for r in sweep if not (r.run_dir / "final_eval.json").exists()]
        if unfinished:
            raise ConfigError(f"the learning-rate sweep has not finished ({unfinished[0]}): "
                              f"run the study without --report-only first",
                              key="--report-only", value=True)
    run_all(launcher, sweep, a.jobs, start=not a.report_only)
    results = {f"{lr:g}": read_run(r).final_loss for lr, r in zip(a.lrs, sweep)}
    best = min(a.lrs, key=lambda lr: results[f"{lr:g}"])
    print(f"learning rate sweep on the baseline ({steps} steps): {results} -> {best:g}",
          flush=True)
    return best, results


def _write_outputs(out: Path, records: list[dict], analysis: dict, meta: dict,
                   title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "study.json", json.dumps({"meta": meta, **analysis, "runs": records}, indent=1))
    report = report_markdown(analysis, meta)
    _write(out / "report.md", report)
    plot_loss(records, analysis, out / "loss_vs_flops.png", title)
    if analysis["compute"]:
        plot_gap(analysis, out / "gap_vs_flops.png", title)
    print(report)
    print(f"wrote {out / 'report.md'}, {out / 'study.json'}, {out / 'loss_vs_flops.png'}"
          + (f", {out / 'gap_vs_flops.png'}" if analysis["compute"] else ""))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _shared_data(cfg, out: Path) -> list[str]:
    """Prepare the demo corpus once for the whole study (runs then read it as indexed data)."""
    if cfg.data.source != "demo":
        return []
    from megatron_tst.data.demo import prepare_demo_data

    demo = prepare_demo_data(out / "data", vocab_size=cfg.data.demo_vocab_size, seed=cfg.seed)
    return ["data.source=indexed", f"data.train_paths=[{demo.train_prefix}]",
            f"data.valid_paths=[{demo.valid_prefix}]", "data.tokenizer.type=sentencepiece",
            f"data.tokenizer.path={demo.tokenizer_path}"]


def _corpus_tokens(cfg, shared: list[str]) -> Optional[int]:
    """Tokens in the training data (for epochs), when it is one indexed dataset."""
    paths = [c.split("=[", 1)[1].rstrip("]") for c in shared if c.startswith("data.train_paths=")]
    paths = paths or list(cfg.data.train_paths)
    if len(paths) != 1 or not Path(paths[0] + ".idx").is_file():
        return None
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(paths[0])  # keep it alive: its arrays view a memory map it closes
    return int(dataset.sequence_lengths.sum())
