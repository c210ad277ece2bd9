"""A study's runs on disk: where each lives, how it is trained and evaluated, what it recorded.

Layout under the study directory::

    runs/steps<N>/<arm>/seed<S>/        one run: N optimizer steps, its own full schedule
    runs/steps<N>/lr-sweep/lr<LR>/      the learning-rate sweep on the baseline
        run.json                         what the run is (recipe, overrides): checked on reuse
        metrics.jsonl, train.log         the trainer's
        checkpoints/                     the latest checkpoint (every tenth of the run; the
                                         final one is kept for re-evaluation)
        final_eval.json                  ``megatron-tst eval`` on the fixed held-out windows
        DONE                             training finished

Every run is the real trainer and the real evaluator, each a child process. A run with ``DONE``
and a matching ``run.json`` is reused; an interrupted one with a matching ``run.json`` resumes
from its latest checkpoint (the trainer's resume is bitwise), any other unfinished one starts
again from scratch (the study owns these directories); a finished one whose evaluation is missing
or unreadable is evaluated again from its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_tst.config import ConfigError
from megatron_tst.config.errors import InputError

BASELINE = "baseline"
BASELINE_OVERRIDES = ["tst.bag_size=1", "tst.ratio=null", "tst.superposition_steps=null"]


class StudyError(InputError):
    """A study's run failed or its files are damaged: the message names the run and the fix."""

    kind = "study error"


def arm_name(s: int, r: float) -> str:
    return f"tst-s{s}-r{r:g}"


def tst_overrides(s: int, r: float) -> list[str]:
    return [f"tst.bag_size={s}", f"tst.ratio={r}", "tst.superposition_steps=null"]


@dataclass
class Run:
    arm: str
    seed: int
    steps: int
    arm_overrides: list[str]
    common: list[str]  # the study's overrides for this run length (learning rate included)
    run_dir: Path

    @property
    def identity(self) -> dict:
        return {"arm": self.arm, "seed": self.seed, "steps": self.steps,
                "arm_overrides": self.arm_overrides, "common": self.common}


def run_dir(out: Path, steps: int, arm: str, seed: int) -> Path:
    return out / "runs" / f"steps{steps}" / arm / f"seed{seed}"


def sweep_dir(out: Path, steps: int, lr: float) -> Path:
    return out / "runs" / f"steps{steps}" / "lr-sweep" / f"lr{lr:g}"


def read_json(path: Path) -> Optional[dict]:
    """A JSON object from ``path``; None when it is missing, truncated or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------------ running
@dataclass
class Launcher:
    recipe: str
    valid_prefix: str  # the held-out data every run's final evaluation reads
    eval_tokens: Optional[int]  # a fixed prefix of it (None: all of it)
    threads: int

    def _env(self) -> dict:
        return {**os.environ, "OMP_NUM_THREADS": str(self.threads), "WANDB_MODE": "disabled"}

    def _child(self, run: Run, cmd: list[str], log: str) -> None:
        with open(run.run_dir / log, "a") as f:  # a resumed run's log goes on
            res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self._env())
        if res.returncode:
            raise StudyError(f"run {run.arm} seed {run.seed} ({run.steps} steps) failed in "
                             f"{log.split('.')[0]} (exit {res.returncode}); see "
                             f"{run.run_dir / log}, then run the study again: it goes on "
                             f"from that run's latest checkpoint")

    def _is_this_run(self, saved: Optional[dict], run: Run) -> bool:
        return saved is not None and {**saved, "recipe": None} == {"recipe": None, **run.identity} \
            and Path(str(saved.get("recipe"))).resolve() == Path(self.recipe).resolve()

    def train(self, run: Run) -> None:
        d = run.run_dir
        if (d / "DONE").exists():
            return
        (d / "final_eval.json").unlink(missing_ok=True)
        if not self._is_this_run(read_json(d / "run.json"), run):  # not this run's: start again
            (d / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(d / "checkpoints", ignore_errors=True)
            d.mkdir(parents=True, exist_ok=True)
            (d / "run.json").write_text(json.dumps({"recipe": self.recipe, **run.identity},
                                                   indent=1) + "\n")
        # else: an interrupted run, resumed from its latest checkpoint (none yet: from step 0);
        # metrics.jsonl then holds the steps after that checkpoint twice (read_run keeps the last)
        self._child(run, [
            sys.executable, "-m", "megatron_tst.cli", "train", self.recipe, f"run_dir={d}",
            f"name={run.arm}-seed{run.seed}-steps{run.steps}", f"seed={run.seed}",
            f"checkpoint.dir={d / 'checkpoints'}", "checkpoint.load=auto",
            f"checkpoint.save_interval={max(1, run.steps // 10)}", "checkpoint.save_final=true",
            "checkpoint.keep_last=1", "logging.wandb=false", *run.common, *run.arm_overrides],
            "train.log")
        (d / "DONE").write_text("ok\n")

    def evaluate(self, run: Run) -> None:
        path = run.run_dir / "final_eval.json"
        if valid_eval(read_json(path), run.steps) is not None:
            return
        tmp = path.with_name("final_eval.json.tmp")
        cmd = [sys.executable, "-m", "megatron_tst.cli", "eval",
               str(run.run_dir / "checkpoints"), "--data", self.valid_prefix, "--json", str(tmp)]
        if self.eval_tokens:
            cmd += ["--max-tokens", str(self.eval_tokens)]
        self._child(run, cmd, "eval.log")
        os.replace(tmp, path)

    def __call__(self, run: Run) -> None:
        self.train(run)
        self.evaluate(run)

    def check_reuse(self, run: Run) -> None:
        """A finished run is reused only if it is the run asked for."""
        if not (run.run_dir / "DONE").exists():
            return
        saved = read_json(run.run_dir / "run.json")
        if saved is None:
            raise StudyError(f"{run.run_dir} is marked finished (DONE) but its run.json is "
                             f"missing or unreadable, so what it ran is unknown: delete that "
                             f"directory to train the run again, or give another --out")
        if not self._is_this_run(saved, run):
            raise ConfigError(
                f"{run.run_dir} holds a finished run with other settings than this study asks "
                f"for (its run.json: {saved}); give another --out, or the same recipe and "
                f"overrides as before, or delete that directory to train it again",
                key="--out", value=str(run.run_dir.parents[3]))


def valid_eval(data: Optional[dict], steps: int) -> Optional[dict]:
    """``final_eval.json``'s content if it is a finished evaluation of step ``steps``."""
    if data is None or data.get("step") != steps or not isinstance(data.get("loss"), float):
        return None
    return data


def run_all(launcher: Launcher, runs: list[Run], jobs: int, start: bool = True) -> None:
    """Train and evaluate ``runs`` (``start``: else only check the finished ones)."""
    for run in runs:  # all refusals before anything runs
        launcher.check_reuse(run)
    if not start:
        return
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for fut in [pool.submit(launcher, r) for r in runs]:
            fut.result()


# ------------------------------------------------------------------------------------ reading
@dataclass
class RunRecord:
    """What a finished run contributes to the study (``study.json``'s ``runs``)."""

    arm: str
    seed: int
    steps: int
    flops_per_step: float
    final_loss: float  # next-token loss on the fixed held-out windows
    eval_tokens: int
    data_tokens: int
    switch_step: Optional[int]
    valid: list[dict] = field(default_factory=list)  # in-training validation {step, loss, flops}
    phase1_tokens_per_s: Optional[float] = None
    tokens_per_s: Optional[float] = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def read_metrics(path: Path) -> list[dict]:
    """``metrics.jsonl``'s records in step order, the last one of each kind and step kept (a
    resumed run logs the steps after its checkpoint again); a line cut short by a crash is
    skipped."""
    latest: dict = {}
    with open(path, encoding="utf-8", errors="replace") as f:  # a damaged line is skipped
        for line in f:
            try:
                r = json.loads(line)
                latest[(r["kind"], r["step"])] = r
            except (ValueError, TypeError, KeyError):
                continue
    return sorted(latest.values(), key=lambda r: r["step"])


def read_run(run: Run) -> RunRecord:
    path = run.run_dir / "metrics.jsonl"
    try:
        records = read_metrics(path)
    except OSError as err:
        records, problem = [], f"cannot be read ({err.strerror})"
    else:
        problem = "holds no training record"
    train = [r for r in records if r.get("kind") == "train" and isinstance(r.get("step"), int)
             and r["step"] > 0 and isinstance(r.get("flops"), (int, float))]
    if not train:
        raise StudyError(f"{path} {problem}, but the run is marked finished: delete "
                         f"{run.run_dir} to train that run again")
    flops = train[0]["flops"] / train[0]["step"]  # cumulative FLOPs at the first logged step
    final = valid_eval(read_json(run.run_dir / "final_eval.json"), run.steps)
    if final is None:
        raise StudyError(f"{run.run_dir / 'final_eval.json'} is missing or not the evaluation "
                         f"of step {run.steps}: run the study without --report-only to evaluate "
                         f"the run again from its checkpoint")
    try:
        sup = [r["tokens_per_s"] for r in train[2:] if r["phase"] == "superposition"]
        std = [r["tokens_per_s"] for r in train[2:] if r["phase"] != "superposition"]
        return RunRecord(
            arm=run.arm, seed=run.seed, steps=run.steps, flops_per_step=flops,
            final_loss=final["loss"], eval_tokens=final["tokens"],
            data_tokens=train[-1]["data_tokens"],
            switch_step=max((r["step"] for r in train if r["phase"] == "superposition"),
                            default=None),
            valid=[{"step": r["step"], "loss": r["loss"], "flops": r["step"] * flops}
                   for r in records if r["kind"] == "valid"],
            phase1_tokens_per_s=_median(sup), tokens_per_s=_median(std))
    except (KeyError, TypeError) as err:
        raise StudyError(f"{path} has a record without {err} (damaged, or written by another "
                         f"version): delete {run.run_dir} to train that run again") from None


def _median(xs: list[float]) -> Optional[float]:
    import statistics

    return statistics.median(xs) if xs else None


def finished_runs(out: Path, recipe: str, common_for) -> tuple[list[Run], list[str]]:
    """Every finished run under ``out/runs`` made with this recipe and ``common_for(steps)``
    (earlier invocations' arms and seeds included), and why each other finished run is not."""
    found, skipped, seen = [], [], set()
    metas = [*(out / "runs").glob("steps*/*/seed*/run.json"),
             *(out / "runs").glob("steps*/lr-sweep/lr*/run.json")]  # one is a baseline run
    for meta in sorted(metas):
        d = meta.parent
        if not (d / "DONE").exists():
            continue
        saved = read_json(meta)
        try:
            run = Run(saved["arm"], int(saved["seed"]), int(saved["steps"]),
                      list(saved["arm_overrides"]), list(saved["common"]), d)
        except (KeyError, TypeError, ValueError):
            skipped.append(f"{d} (its run.json is unreadable)")
            continue
        if Path(str(saved.get("recipe"))).resolve() != Path(recipe).resolve() \
                or run.common != common_for(run.steps):
            if "lr-sweep" not in d.parts:  # the other learning rates are not skipped results
                skipped.append(f"{d} (made with other settings)")
        elif valid_eval(read_json(d / "final_eval.json"), run.steps) is None:
            skipped.append(f"{d} (its final_eval.json is missing or damaged: run the study "
                           f"without --report-only to evaluate it again)")
        elif (run.steps, run.arm, run.seed) not in seen:
            seen.add((run.steps, run.arm, run.seed))
            found.append(run)
    return found, skipped
