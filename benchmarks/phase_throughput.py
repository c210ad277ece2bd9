"""Superposition-phase data throughput vs the baseline on the same model and batch.

Runs the real trainer twice through the CLI (fresh processes): the baseline (bag size 1) and the
superposition phase only (ratio 1), reads the per-step records from metrics.jsonl, and prints the
median data tokens/s of each and their ratio. Target: phase-1 data tokens/s >= 0.9 * s * baseline
(equal FLOPs per step, so only data loading, bag folding and the superposed embedding may cost).

    python benchmarks/phase_throughput.py                      # demo model, s=4, CPU
    python benchmarks/phase_throughput.py --bag-size 6 --steps 40 --recipe configs/demo-cpu.yaml
    torchrun-free on GPU:  python benchmarks/phase_throughput.py --recipe configs/270m-tst.yaml ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class TrainingFailed(RuntimeError):
    """A training subprocess exited non-zero; the message ends with its output's tail."""


# What every benchmark training sets: no checkpoints, no evaluation, no wandb.
RUN_OVERRIDES = ["checkpoint.load=none", "checkpoint.save_interval=0",
                 "checkpoint.save_final=false", "training.eval_interval=0", "logging.wandb=false"]


def run(recipe: str, run_dir: Path, overrides: list[str], env: dict | None = None,
        timeout: float | None = None) -> list[dict]:
    """Train ``recipe`` in a fresh process (``python -m megatron_tst.cli train``) with no
    checkpoints and no evaluation; return its per-step ``train`` records from metrics.jsonl.
    ``env``: the process's environment (default this one's); ``timeout``: seconds."""
    cmd = [sys.executable, "-m", "megatron_tst.cli", "train", recipe, f"run_dir={run_dir}",
           *RUN_OVERRIDES, *overrides]
    env = {**(os.environ if env is None else env), "WANDB_MODE": "disabled"}
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise TrainingFailed(f"{' '.join(cmd)}\ndid not finish within {timeout:.0f} s") from err
    if res.returncode:
        raise TrainingFailed(f"{' '.join(cmd)} failed (exit {res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    with open(Path(run_dir) / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def prepare_demo_data(work: Path, every: int = 1, env: dict | None = None,
                      timeout: float | None = None) -> tuple[str, str]:
    """The demo corpus (every ``every``-th document) as JSON Lines, preprocessed by
    ``megatron-tst preprocess`` with a sentencepiece tokenizer of 4,096 pieces trained on it:
    (dataset prefix, tokenizer path) under ``work``."""
    from megatron_tst.data.corpus import demo_documents

    src, prefix = work / "demo.jsonl", work / "data" / "demo"
    with open(src, "w", encoding="utf-8") as f:
        for doc in demo_documents()[::every]:
            f.write(json.dumps({"text": doc.text}) + "\n")
    cmd = [sys.executable, "-m", "megatron_tst.cli", "preprocess", "--input", str(src),
           "--output-prefix", str(prefix), "--train-tokenizer", "--vocab-size", "4096"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=os.environ if env is None else env)
    if proc.returncode:
        raise RuntimeError("megatron-tst preprocess failed: "
                           + (proc.stderr.strip().splitlines() or ["(no output)"])[-1])
    return str(prefix), str(prefix) + ".tokenizer.model"


def median(records: list[dict], key: str, skip: int = 0) -> float:
    """The median of ``key`` over ``records`` after the first ``skip`` (warm-up) steps."""
    return statistics.median(r[key] for r in records[skip:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(REPO / "configs" / "demo-cpu.yaml"))
    p.add_argument("--bag-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    p.add_argument("--workers", type=int, default=0, help="data.num_workers")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for both runs")
    a = p.parse_args()
    common = [f"training.train_steps={a.steps}", "schedule.warmup_steps=1",
              "schedule.decay_fraction=0", f"data.num_workers={a.workers}", *a.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            base = run(a.recipe, Path(tmp) / "base", ["tst.bag_size=1", "tst.ratio=null", *common])
            tst = run(a.recipe, Path(tmp) / "tst",
                      [f"tst.bag_size={a.bag_size}", "tst.ratio=1.0", *common])
        except TrainingFailed as err:
            sys.exit(str(err))
    assert all(r["phase"] == "superposition" for r in tst)
    b_tok, t_tok = median(base, "tokens_per_s", a.warmup), median(tst, "tokens_per_s", a.warmup)
    b_time, t_time = median(base, "step_time_s", a.warmup), median(tst, "step_time_s", a.warmup)
    ratio = t_tok / b_tok
    print(f"recipe {Path(a.recipe).name}, {a.steps} steps (median of the last {a.steps - a.warmup})")
    print(f"{'run':<22}{'step time (s)':>14}{'data tokens/s':>16}{'positions/s':>14}")
    print(f"{'baseline':<22}{b_time:>14.4f}{b_tok:>16,.0f}"
          f"{median(base, 'positions_per_s', a.warmup):>14,.0f}")
    print(f"{f'superposition s={a.bag_size}':<22}{t_time:>14.4f}{t_tok:>16,.0f}"
          f"{median(tst, 'positions_per_s', a.warmup):>14,.0f}")
    verdict = "meets" if ratio >= 0.9 * a.bag_size else "MISSES"
    print(f"data tokens/s ratio {ratio:.2f} = {ratio / a.bag_size:.2f} * s "
          f"({verdict} the 0.9 * s target)")


if __name__ == "__main__":
    main()
