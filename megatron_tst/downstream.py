"""One downstream evaluation: ``python -m megatron_tst.downstream CHECKPOINT --out DIR ...``.

What ``evaluation.downstream`` (``training/downstream.py``) starts in a child process or a Slurm
job: export the weights-only checkpoint to a Hugging Face directory (``export/hf.py``), run
lm-evaluation-harness on it, and leave ``DIR/results.json`` (``{"step", "tasks", "scores":
{"<task>/<metric>": value}, "elapsed_s"}``) or ``DIR/failed.json`` (``{"error"}``), each written
under a temporary name and renamed, so the trainer never reads half a file. The exported model,
and the checkpoint when it lies inside DIR (the trainer's copy), are removed afterwards
(``--keep`` keeps them). Offline: lm-evaluation-harness
reads local task YAMLs (``--include-path``) and the Hub's caches only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from megatron_tst.training.downstream import FAILED, RESULTS, write_json


def scores_of(results: dict) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` from lm-evaluation-harness's results (its keys read
    ``"acc,none"``: the metric and its filter; standard errors are left out)."""
    scores = {}
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in sorted(metrics.items()):
            metric, _, filt = key.partition(",")
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or metric.endswith("_stderr"):
                continue
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            scores[f"{task}/{name}"] = float(value)
    return scores


def evaluate(a) -> dict:
    from megatron_tst.export.hf import export_checkpoint

    out = Path(a.out)
    hf = out / "hf"
    export_checkpoint(a.checkpoint, hf, force=True, dtype=a.dtype)  # as the trainer decided
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=a.include_path) if a.include_path else TaskManager()
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf},dtype={a.dtype}", tasks=a.tasks,
        num_fewshot=a.num_fewshot, limit=a.limit, batch_size=a.batch_size, device=a.device,
        task_manager=manager, log_samples=False)
    return scores_of(results or {})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_tst.downstream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a (weights-only) checkpoint of the run")
    p.add_argument("--out", required=True, help="the evaluation's directory")
    p.add_argument("--step", type=int, required=True, help="the training step of the weights")
    p.add_argument("--tasks", required=True, help="comma-separated lm-evaluation-harness tasks")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--include-path", default=None)
    p.add_argument("--keep", action="store_true", help="keep the export and the checkpoint")
    a = p.parse_args(argv)
    a.tasks = [t for t in a.tasks.split(",") if t]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tic = time.time()
    try:
        scores = evaluate(a)
        write_json(out / RESULTS, {"step": a.step, "tasks": a.tasks, "scores": scores,
                                   "elapsed_s": time.time() - tic})
        status = 0
    except BaseException as err:  # anything: the trainer logs it and goes on
        write_json(out / FAILED, {"step": a.step, "error": f"{type(err).__name__}: {err}"[:2000]})
        print(f"downstream evaluation of step {a.step} failed: {type(err).__name__}: {err}",
              file=sys.stderr)
        status = 1
    if not a.keep:
        shutil.rmtree(out / "hf", ignore_errors=True)
        if Path(a.checkpoint).resolve().is_relative_to(out.resolve()):  # the trainer's copy
            shutil.rmtree(a.checkpoint, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
