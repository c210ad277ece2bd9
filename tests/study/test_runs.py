"""``study/runs.py``: reading what a run logged, including a run that was resumed after a kill."""

import json

import pytest

from megatron_tst.study.runs import (BASELINE, BASELINE_OVERRIDES, Launcher, Run, StudyError,
                                     finished_runs, read_metrics, read_run, run_dir)


def test_a_resumed_runs_metrics_keep_the_last_record_of_each_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = [{"kind": "train", "step": s, "loss": 5.0 - s, "tokens_per_s": 1.0} for s in (1, 2, 3)]
    again = [{"kind": "train", "step": s, "loss": 5.0 - s, "tokens_per_s": 2.0} for s in (3, 4)]
    lines = [json.dumps(r) for r in first] + ['{"kind": "train", "st']  # cut short by the kill
    lines += [json.dumps({"kind": "event", "step": 2, "message": "resumed from step_0000002"})]
    lines += [json.dumps(r) for r in again]
    lines += [json.dumps({"kind": "valid", "step": 4, "loss": 0.5})]
    path.write_text("\n".join(lines) + "\n")
    records = read_metrics(path)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("event", 2), ("train", 3), ("train", 4), ("valid", 4)]
    assert [r["tokens_per_s"] for r in records if r["kind"] == "train"] == [1.0, 1.0, 2.0, 2.0]


def _finished_run(tmp_path, recipe="r.yaml"):
    d = run_dir(tmp_path, 10, BASELINE, 1)
    d.mkdir(parents=True)
    run = Run(BASELINE, 1, 10, BASELINE_OVERRIDES, ["training.train_steps=10"], d)
    (d / "run.json").write_text(json.dumps({"recipe": recipe, **run.identity}))
    (d / "metrics.jsonl").write_text(json.dumps(
        {"kind": "train", "step": 1, "flops": 2.0, "loss": 4.0, "phase": "standard",
         "data_tokens": 64, "tokens_per_s": 10.0}) + "\n")
    (d / "final_eval.json").write_text(json.dumps({"step": 10, "loss": 3.5, "tokens": 99}))
    (d / "DONE").write_text("ok\n")
    return run


@pytest.mark.parametrize("damage", ["truncated", "not an object", "binary", "missing"])
def test_a_finished_run_with_a_damaged_run_json_is_refused_by_name(tmp_path, damage):
    run = _finished_run(tmp_path)
    meta = run.run_dir / "run.json"
    if damage == "missing":
        meta.unlink()
    else:
        meta.write_bytes({"truncated": meta.read_bytes()[:30], "not an object": b"[1, 2]",
                          "binary": bytes(range(256))}[damage])
    launcher = Launcher("r.yaml", "valid", None, 1)
    with pytest.raises(StudyError, match=rf"{run.run_dir} is marked finished.*run.json is "
                       r"missing or unreadable.*delete that directory"):
        launcher.check_reuse(run)
    found, skipped = finished_runs(tmp_path, "r.yaml", lambda steps: run.common)
    assert found == [] and skipped == ([] if damage == "missing" else
                                       [f"{run.run_dir} (its run.json is unreadable)"])


def test_a_damaged_evaluation_or_log_is_named_with_its_fix(tmp_path):
    run = _finished_run(tmp_path)
    found, skipped = finished_runs(tmp_path, "r.yaml", lambda steps: run.common)
    assert found == [run] and read_run(run).final_loss == 3.5 and skipped == []
    (run.run_dir / "final_eval.json").write_text('{"step": 10, "lo')
    assert finished_runs(tmp_path, "r.yaml", lambda steps: run.common)[1] == [
        f"{run.run_dir} (its final_eval.json is missing or damaged: run the study without "
        f"--report-only to evaluate it again)"]
    with pytest.raises(StudyError, match="without --report-only"):
        read_run(run)
    (run.run_dir / "metrics.jsonl").write_bytes(b"\xfe\xff garbage\n")
    with pytest.raises(StudyError, match=rf"metrics.jsonl holds no training record.*delete "
                       rf"{run.run_dir}"):
        read_run(run)
    (run.run_dir / "final_eval.json").write_text(json.dumps({"step": 10, "loss": 3.5, "tokens": 9}))
    (run.run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "flops": 2.0}\n')
    with pytest.raises(StudyError, match=r"metrics.jsonl has a record without 'data_tokens'"):
        read_run(run)
    # a run made with another recipe is reported as such, not as damaged
    assert finished_runs(tmp_path, "other.yaml", lambda steps: run.common)[1] == [
        f"{run.run_dir} (made with other settings)"]


def test_a_failed_run_names_its_log(tmp_path):
    """The trainer refuses a missing recipe: the study says which run failed and where to look."""
    d = run_dir(tmp_path, 10, BASELINE, 1)
    run = Run(BASELINE, 1, 10, BASELINE_OVERRIDES, [], d)
    with pytest.raises(StudyError, match=rf"run baseline seed 1 \(10 steps\) failed in train "
                       rf"\(exit 2\); see {d / 'train.log'}"):
        Launcher(str(tmp_path / "missing.yaml"), "valid", None, 1).train(run)
    assert "missing.yaml" in (d / "train.log").read_text()
    assert not (d / "DONE").exists()
