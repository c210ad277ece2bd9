"""The loop's policies on their own: time limit, non-finite steps, loss spikes, status file."""

from __future__ import annotations

import json

from megatron_tst.config import load_config
from megatron_tst.training.checkpoint import TrainState
from megatron_tst.training.metrics import MetricsLogger
from megatron_tst.training.policies import (NonFinitePolicy, Outcome, SpikeWatch, StatusFile,
                                            StopConditions)
from megatron_tst.training.signals import FAILED, PREEMPTED, TIME_LIMIT


def cfg(tmp_path, *overrides):
    return load_config(None, ["data.source=demo", "schedule.warmup_steps=1",
                              f"run_dir={tmp_path}", "logging.wandb=false", *overrides])


def test_time_limit_leaves_room_for_the_longest_step_and_a_save(tmp_path):
    stop = StopConditions(cfg(tmp_path, "training.time_limit_minutes=1"))
    try:
        assert not stop.time_is_up() and stop.check() is None
        stop.longest_step_s, stop.last_save_s = 30.0, 20.0
        assert not stop.time_is_up()  # 60 s left > 50 s
        stop.started -= 15
        assert stop.time_is_up() and stop.check() == TIME_LIMIT  # 45 s left < 50 s
        assert stop.outcome(TIME_LIMIT) == Outcome(PREEMPTED, TIME_LIMIT)
        assert stop.outcome("SIGUSR1") == Outcome(PREEMPTED, "signal", "SIGUSR1")
    finally:
        stop.signals.restore()
    never = StopConditions(cfg(tmp_path))
    never.started -= 10**6
    never.signals.restore()
    assert not never.time_is_up()


def test_nonfinite_skip_counts_and_stop_saves(tmp_path):
    metrics = MetricsLogger(cfg(tmp_path), enabled=True)
    state, saved = TrainState(step=4), []
    skip = NonFinitePolicy(cfg(tmp_path, "training.nonfinite=skip").training, metrics)
    assert skip({"nonfinite": ["loss"]}, state, lambda: saved.append(state.step)) is None
    assert state.skipped_steps == 1 and saved == []
    stop = NonFinitePolicy(cfg(tmp_path).training, metrics)
    assert stop({"nonfinite": ["loss", "grad"]}, state, lambda: saved.append(state.step)) == \
        Outcome(FAILED, "nonfinite")
    assert saved == [4]
    metrics.close()
    events = [json.loads(line)["message"] for line in (tmp_path / "metrics.jsonl").open()]
    assert events == ["non-finite loss: update skipped", "non-finite loss and grad: stopped"]


def test_skipping_is_bounded_and_protects_the_last_good_checkpoint(tmp_path):
    """Past training.max_consecutive_skips in a row, or training.max_skipped_steps in all, the
    run stops as nonfinite; the checkpoint saved before a streak is protected until a step
    trains again."""
    c = cfg(tmp_path, "training.nonfinite=skip", "training.max_consecutive_skips=2",
            "training.max_skipped_steps=3")
    metrics, state, saved = MetricsLogger(c, enabled=False), TrainState(step=10), []
    policy = NonFinitePolicy(c.training, metrics)
    bad = {"nonfinite": ["grad"]}
    assert policy(bad, state, lambda: saved.append(1), "step_0000010") is None
    assert policy(bad, state, lambda: saved.append(1), "step_0000011") is None
    assert policy.protected == "step_0000010"  # the one before the streak, not a later one
    assert policy(bad, state, lambda: saved.append(1)) == Outcome(FAILED, "nonfinite")  # 3 in a row
    assert saved == [1] and state.skipped_steps == 3
    policy, state = NonFinitePolicy(c.training, metrics), TrainState(skipped_steps=3)
    assert policy(bad, state, lambda: None) == Outcome(FAILED, "nonfinite")  # 4 in the run
    policy = NonFinitePolicy(c.training, metrics)
    policy(bad, TrainState(), lambda: None, "step_0000002")
    policy.trained()
    assert policy.protected is None and policy.consecutive == 0


def test_spikes_are_flagged_and_the_switch_is_an_event(tmp_path):
    metrics = MetricsLogger(cfg(tmp_path), enabled=True)
    watch = SpikeWatch(6.0, metrics, enabled=True)
    steps = [{"loss": 3.0 + 0.01 * (i % 3), "phase": "superposition"} for i in range(12)]
    steps += [{"loss": 9.0, "phase": "superposition"}, {"loss": 5.0, "phase": "recovery"}]
    for i, m in enumerate(steps, 1):
        watch(i, m)
    assert steps[12]["loss_spike"] is True and steps[13]["loss_spike"] is False
    assert "loss_spike" not in steps[11]
    metrics.close()
    events = [json.loads(line)["message"] for line in (tmp_path / "metrics.jsonl").open()]
    assert len(events) == 1 and "at the switch to the recovery phase" in events[0]


def test_status_file_is_written_by_rank_zero_only(tmp_path):
    c = cfg(tmp_path)
    StatusFile(c, rank=1).write("running", 0)
    assert not (tmp_path / "exit_status.json").exists()
    StatusFile(c, rank=0).write("preempted", 7, "ckpt", "SIGTERM", "signal")
    status = json.loads((tmp_path / "exit_status.json").read_text())
    assert status == {"status": "preempted", "step": 7, "train_steps": c.training.train_steps,
                      "checkpoint": "ckpt", "signal": "SIGTERM", "reason": "signal",
                      "skipped_steps": 0}
