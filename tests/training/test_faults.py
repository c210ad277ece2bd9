"""Numerical faults and the time limit, in real runs: a NaN written into rank 0's gradients
(the grad:nan failpoint) is caught by every rank before the update; the policy skips the update
or saves the last good state and stops; loss spikes are flagged, the one at the switch is
expected; training.time_limit_minutes saves and exits like a signal."""

from __future__ import annotations

import json

import pytest

from megatron_tst.training import checkpoint as ckpt
from megatron_tst.training.faults import EXIT_NONFINITE, SpikeDetector
from tests.conftest import read_metrics, run_cli

TST = ["tst.bag_size=2", "tst.superposition_steps=2", "training.eval_interval=0"]
NAN_AT_3 = {"MEGATRON_TST_FAILPOINT": "grad:nan@3"}


def _events(run):
    return [r["message"] for r in read_metrics(run, "event")]


@pytest.mark.newest_line
def test_skip_policy_on_two_ranks_skips_one_update(tiny_recipe, tmp_path):
    """The NaN is on rank 0 only (after the DP all-reduce): rank 1's gradients are finite, yet
    both ranks skip step 3, and training goes on."""
    run = tmp_path / "run"
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *TST,
                   "training.nonfinite=skip"], nproc=2, env=NAN_AT_3)
    records = {r["step"]: r for r in read_metrics(run)}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert records[3]["skipped"] and records[3]["nonfinite"] == ["grad"]
    assert records[3]["grad_norm"] is None and records[6]["skipped_steps"] == 1
    assert not any(records[s]["skipped"] for s in (1, 2, 4, 5, 6))
    assert "rank 0: non-finite gradients" in res.stdout + res.stderr
    assert "non-finite grad: update skipped" in _events(run)
    status = json.loads((run / "exit_status.json").read_text())
    assert status["status"] == "finished"


@pytest.mark.newest_line
def test_stop_policy_saves_the_last_good_state(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *TST], env=NAN_AT_3, check=False)
    assert res.returncode == EXIT_NONFINITE, res.stderr[-2000:]
    status = json.loads((run / "exit_status.json").read_text())
    assert (status["status"], status["reason"], status["step"]) == ("failed", "nonfinite", 2)
    root = run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000002"
    assert ckpt.is_complete(root / "step_0000002")
    assert "step 3: non-finite grad" in res.stdout and "training.nonfinite=skip" in res.stdout
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    # Resumed without the fault it goes on from step 2 (the policy key is free to change).
    run_cli(["train", str(tiny_recipe), f"run_dir={run}", *TST, "training.nonfinite=skip"])
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.newest_line
def test_time_limit_saves_and_exits_75(tiny_recipe, tmp_path):
    """A 0.6 s limit on a 200-step run: it stops early with a checkpoint, and the next job
    resumes from it."""
    run = tmp_path / "run"
    args = ["train", str(tiny_recipe), f"run_dir={run}", *TST, "training.train_steps=200",
            "training.log_interval=50"]
    res = run_cli([*args, "training.time_limit_minutes=0.01"], check=False)
    assert res.returncode == 75, res.stderr[-2000:]
    status = json.loads((run / "exit_status.json").read_text())
    assert (status["status"], status["reason"], status["signal"]) == ("preempted", "time_limit", None)
    stopped = status["step"]
    assert 1 <= stopped < 200 and status["checkpoint"].endswith(ckpt.step_dir_name(stopped))
    assert "training.time_limit_minutes is near" in res.stdout
    run_cli(args)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 201))


def test_spike_detector():
    d = SpikeDetector(sigma=6.0, window=20, min_history=5)
    losses = [3.0, 3.01, 2.99, 3.02, 2.98, 3.0, 2.97]
    assert all(d.update(x, "superposition") is None for x in losses)
    message, expected = d.update(9.0, "superposition")
    assert not expected and "loss spike: 9.0000" in message
    message, expected = d.update(4.5, "recovery")  # the switch: new phase, new history
    assert expected and "at the switch to the recovery phase" in message
    assert d.update(4.4, "recovery") is None
    assert SpikeDetector(sigma=0).update(1e9, "x") is None  # off


def test_switch_jump_is_logged_as_expected(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    run_cli(["train", str(tiny_recipe), f"run_dir={run}", *TST])
    events = _events(run)
    assert sum("at the switch to the recovery phase (expected" in e for e in events) == 1
    assert not any(r.get("loss_spike") for r in read_metrics(run))
