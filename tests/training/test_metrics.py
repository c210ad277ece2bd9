"""The run directory's wandb id survives resumes, and a damaged id file is replaced."""

from __future__ import annotations

from megatron_tst.training.metrics import _wandb_id


def test_wandb_id_is_stable_and_a_damaged_one_is_replaced(tmp_path):
    first = _wandb_id(tmp_path)
    assert len(first) == 12 and _wandb_id(tmp_path) == first
    for damage in (b"\xff\x00garbage", b"", b"../../x"):
        (tmp_path / "wandb_id.txt").write_bytes(damage)
        fresh = _wandb_id(tmp_path)
        assert len(fresh) == 12 and (tmp_path / "wandb_id.txt").read_text() == fresh


def test_scores_of_an_earlier_step_go_to_every_sink(tmp_path, monkeypatch):
    """``log_at``: downstream scores arrive steps after the step they measure; metrics.jsonl and
    TensorBoard take that step, wandb (offline here) plots them against ``downstream/step``
    (its own step only grows: logging step 4 after step 6 would be dropped)."""
    import json

    import pytest

    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_tst.config import RunConfig
    from megatron_tst.training.metrics import MetricsLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    cfg.logging.tensorboard = True
    metrics = MetricsLogger(cfg, enabled=True)
    metrics.log(6, {"loss": 3.0})
    metrics.log_at(4, {"arc_easy/acc": 0.5}, kind="downstream")
    metrics.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert records[-1] == {"kind": "downstream", "step": 4, "arc_easy/acc": 0.5}
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("downstream/arc_easy/acc")] == [(4, 0.5)]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
