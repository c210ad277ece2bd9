"""``megatron-tst study`` at smoke size: a real two-length sweep through the real trainer and
evaluator, reuse, a second invocation that adds to the report, and bad input."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_tst.study.cli import parse_arm
from tests.conftest import REPO, run_cli

SMALL = ["--seeds", "1", "2", "--eval-points", "2", "schedule.warmup_steps=1"]


@pytest.mark.oldest_line
@pytest.mark.timeout(3600)  # about 2 minutes on 2 quiet cores: 20 child processes
def test_a_tiny_compute_sweep(tiny_recipe, tmp_path, synthetic_data):
    out = tmp_path / "study"
    args = ["study", str(tiny_recipe), "--out", str(out), "--arms", "s=2,r=0.5",
            "--steps", "4", "6", "--jobs", "2", *SMALL]
    res = run_cli(args, timeout=3000)
    study = json.loads((out / "study.json").read_text())
    runs = study["runs"]
    assert sorted((r["steps"], r["arm"], r["seed"]) for r in runs) == sorted(
        (n, a, s) for n in (4, 6) for a in ("baseline", "tst-s2-r0.5") for s in (1, 2))
    # every final loss is over the same windows: the whole held-out set (EOD first)
    valid_tokens = Path(synthetic_data["valid"] + ".bin").stat().st_size // 2
    assert {r["eval_tokens"] for r in runs} == {valid_tokens}
    for r in runs:
        d = out / "runs" / f"steps{r['steps']}" / r["arm"] / f"seed{r['seed']}"
        ev = json.loads((d / "final_eval.json").read_text())
        assert ev["step"] == r["steps"] and ev["loss"] == r["final_loss"]
        assert ev["data"].endswith(synthetic_data["valid"])
        assert (d / "checkpoints" / "latest").exists()  # kept for re-evaluation
        assert r["valid"][-1]["step"] == r["steps"]  # the in-training curve, for the plot
    # each length has its own schedule: the TST switch at r * steps
    assert {(r["steps"], r["switch_step"]) for r in runs if r["arm"] != "baseline"} == \
        {(4, 2), (6, 3)}
    assert set(study["lengths"]) == {"4", "6"}
    gap = study["compute"]["tst-s2-r0.5"]
    assert [p["steps"] for p in gap["points"]] == [4, 6]
    assert all(p["lo"] < p["mean"] < p["hi"] for p in gap["points"])
    assert gap["crossover"]["text"]
    report = (out / "report.md").read_text()
    assert "## 4 steps" in report and "## 6 steps" in report and "crosses zero" in report \
        or "not within the sweep" in report
    assert (out / "gap_vs_flops.png").stat().st_size > 10_000
    assert (out / "loss_vs_flops.png").stat().st_size > 10_000
    assert "report.md" in res.stdout

    # A finished study is reused as it is; a damaged evaluation is made again from the kept
    # checkpoint, and nothing is trained again.
    d = out / "runs" / "steps4" / "baseline" / "seed1"
    (d / "final_eval.json").write_text('{"step": 4, "lo')
    trained = (d / "metrics.jsonl").stat().st_mtime_ns
    run_cli(args, timeout=1200)
    assert json.loads((out / "study.json").read_text())["runs"] == runs
    assert (d / "metrics.jsonl").stat().st_mtime_ns == trained

    # Another invocation with another arm adds to the report instead of replacing it (one new
    # run: the baseline's is reused).
    run_cli(["study", str(tiny_recipe), "--out", str(out), "--arms", "s=3,r=0.5", "--steps", "4",
             *SMALL[:1], "1", *SMALL[3:]], timeout=1200)
    again = json.loads((out / "study.json").read_text())
    assert {(r["steps"], r["arm"], r["seed"]) for r in again["runs"]} == \
        {(r["steps"], r["arm"], r["seed"]) for r in runs} | {(4, "tst-s3-r0.5", 1)}
    assert "| tst-s2-r0.5 |" in (out / "report.md").read_text()

    # --report-only starts nothing: an arm that never ran is not in the report
    run_cli(["study", str(tiny_recipe), "--out", str(out), "--arms", "s=4,r=0.5", "--steps", "4",
             "6", "--report-only", *SMALL], timeout=600)
    assert not (out / "runs" / "steps4" / "tst-s4-r0.5").exists()
    assert json.loads((out / "study.json").read_text())["runs"] == again["runs"]

    # The same directory with other settings: refused, naming the run, nothing trained.
    res = run_cli([*args[:-1], "schedule.warmup_steps=2"], timeout=1200, check=False)
    assert res.returncode == 2 and "with other settings" in res.stderr and "--out" in res.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 2 minutes on 2 quiet cores
def test_a_killed_study_resumes_its_runs_from_their_checkpoints(tiny_recipe, tmp_path):
    """kill -9 of the whole study after the TST run's switch; the next invocation resumes that run
    from its latest checkpoint and reports what an uninterrupted study reports, bitwise."""
    args = ["--arms", "s=2,r=0.5", "--steps", "20", "--seeds", "1", "--jobs", "1",
            "--eval-points", "2", "schedule.warmup_steps=1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_cli(["study", str(tiny_recipe), "--out", str(whole), *args], timeout=3000)

    tst = cut / "runs" / "steps20" / "tst-s2-r0.5" / "seed1"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_tst.cli", "study", str(tiny_recipe),
                             "--out", str(cut), *args], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 3000
    try:
        while True:  # checkpoints every 2 steps, the switch at step 10
            latest = tst / "checkpoints" / "latest"
            text = latest.read_text().strip() if latest.exists() else ""
            if text.startswith("step_") and 12 <= int(text[5:]) < 16:
                break
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint to cut at"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tst / "DONE").exists()

    run_cli(["study", str(tiny_recipe), "--out", str(cut), *args], timeout=3000)
    keys = ("arm", "final_loss", "eval_tokens", "valid", "switch_step")
    assert [{k: r[k] for k in keys} for r in json.loads((cut / "study.json").read_text())["runs"]] \
        == [{k: r[k] for k in keys} for r in json.loads((whole / "study.json").read_text())["runs"]]
    logged = []
    for line in (tst / "metrics.jsonl").open():
        try:
            logged.append(json.loads(line))
        except ValueError:  # the line the kill cut short
            pass
    resumed = [r["step"] for r in logged
               if r["kind"] == "event" and r["message"].startswith("resumed from")]
    assert len(resumed) == 1 and 12 <= resumed[0] < 20, logged  # resumed, not started again
    steps = [r["step"] for r in logged if r["kind"] == "train"]
    assert steps.count(1) == 1 and max(steps) == 20, steps


@pytest.mark.slow
@pytest.mark.timeout(3600)  # about 1 minute on 2 quiet cores: 7 runs
def test_seeds_added_at_one_length_reuse_the_learning_rate_sweep(tiny_recipe, tmp_path):
    out = tmp_path / "study"
    common = ["study", str(tiny_recipe), "--out", str(out), "--arms", "s=2,r=0.5", "--jobs", "2",
              "--lrs", "1e-3", "2e-3", "--eval-points", "2", "schedule.warmup_steps=1"]
    run_cli([*common, "--steps", "4", "6", "--seeds", "1"], timeout=3000)
    sweep = sorted((out / "runs" / "steps4" / "lr-sweep").glob("lr*/metrics.jsonl"))
    trained = [p.stat().st_mtime_ns for p in sweep]
    assert len(sweep) == 2

    # more seeds at 6 steps only: the sweep at 4 steps is reused, not run again at 6
    run_cli([*common, "--steps", "6", "--lr-steps", "4", "--seeds", "1", "2"], timeout=3000)
    assert not (out / "runs" / "steps6" / "lr-sweep").exists()
    assert [p.stat().st_mtime_ns for p in sweep] == trained
    study = json.loads((out / "study.json").read_text())
    assert study["meta"]["lr_steps"] == 4
    assert sorted((r["steps"], r["arm"], r["seed"]) for r in study["runs"]) == sorted(
        [(4, "baseline", 1), (4, "tst-s2-r0.5", 1)]
        + [(6, a, s) for a in ("baseline", "tst-s2-r0.5") for s in (1, 2)])


def test_arms_are_read_strictly():
    assert parse_arm("s=2,r=0.3") == (2, 0.3)
    for bad, words in [("s=2", "cannot read"), ("s=1,r=0.3", "s >= 2"),
                       ("s=2,r=1.5", "in (0, 1)"), ("s=2,r=0.3,q=1", "unknown keys"),
                       ("2,0.3", "cannot read")]:
        with pytest.raises(Exception, match=re.escape(words)):
            parse_arm(bad)


def test_bad_study_arguments_are_refused_before_anything_runs(tiny_recipe, tmp_path):
    out = tmp_path / "study"
    for extra, words in [(["--arms", "s=2,r=0.3", "--bag-sizes", "2"], "not both"),
                         (["--steps", "1"], "not longer than the warmup"),
                         (["--lrs", "1e-3", "--lr-steps", "1"], "not longer than the warmup"),
                         (["--lr-steps", "10"], "give the rates with --lrs"),
                         (["--eval-tokens", "5"], "at least one window"),
                         (["--arms", "s=2"], "s=BAG_SIZE,r=RATIO"),
                         (["data.valid_paths=[]"], "one held-out indexed dataset"),
                         (["--report-only"], "no finished run")]:
        res = run_cli(["study", str(tiny_recipe), "--out", str(out), *extra], timeout=300,
                      check=False)
        assert res.returncode == 2 and words in res.stderr, (extra, res.stderr)
        assert not out.exists()


def documented_study_commands() -> list[str]:
    """Every ``megatron-tst study`` command the README, the docs and the recipes show."""
    commands = []
    for path in [REPO / "README.md", *(REPO / "docs").glob("*.md"),
                 *(REPO / "configs").glob("*.yaml")]:
        text = re.sub(r"\\\n[#\s]*", " ", path.read_text())  # join continued lines
        commands += [m.group(0) for m in re.finditer(r"megatron-tst study [^\n`]*", text)]
    return commands


def test_documented_study_commands_parse():
    """The study commands users are shown take hours; their arguments are checked here."""
    import argparse

    from megatron_tst.study.cli import add_study_arguments, requested_arms

    commands = documented_study_commands()
    assert any("--steps" in c and "--arms" in c for c in commands), commands
    for command in commands:
        p = argparse.ArgumentParser(exit_on_error=False)
        add_study_arguments(p)
        args = p.parse_args(shlex.split(command.split("#")[0])[2:])
        assert (REPO / args.recipe).is_file(), command
        requested_arms(args)
