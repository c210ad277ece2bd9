"""``study/runs.py``: reading what a run logged, including a run that was resumed after a kill."""

import json

from megatron_tst.study.runs import read_metrics


def test_a_resumed_runs_metrics_keep_the_last_record_of_each_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = [{"kind": "train", "step": s, "loss": 5.0 - s, "tokens_per_s": 1.0} for s in (1, 2, 3)]
    again = [{"kind": "train", "step": s, "loss": 5.0 - s, "tokens_per_s": 2.0} for s in (3, 4)]
    lines = [json.dumps(r) for r in first] + ['{"kind": "train", "st']  # cut short by the kill
    lines += [json.dumps({"kind": "event", "step": 2, "message": "resumed from step_0000002"})]
    lines += [json.dumps(r) for r in again] + [json.dumps({"kind": "valid", "step": 4, "loss": 0.5})]
    path.write_text("\n".join(lines) + "\n")
    records = read_metrics(path)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("event", 2), ("train", 3), ("train", 4), ("valid", 4)]
    assert [r["tokens_per_s"] for r in records if r["kind"] == "train"] == [1.0, 1.0, 2.0, 2.0]
