"""Resuming with an edited recipe: refused changes are listed with their fix, explicit ones
apply once named in checkpoint.allow_changes, free ones just work."""

from __future__ import annotations

import pytest

from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.plan import RunPlan
from megatron_tst.training.resume import check_resume
from megatron_tst.training.saved import SavedCheckpoint
from tests.conftest import read_metrics, run_cli

TST = ["tst.bag_size=2", "tst.superposition_steps=2", "training.eval_interval=0"]


def _check(saved: RunConfig, now: RunConfig, step=4, phase="recovery", vocab=(96, 96)):
    checkpoint = SavedCheckpoint("ckpt", saved.to_dict(),
                                 {"step": step, "phase": phase, "vocab_size": vocab[0]})
    return check_resume(checkpoint, RunPlan.build(now).with_vocab(vocab[1]))


def test_every_refused_change_is_listed_with_its_fix():
    saved, now = RunConfig(), RunConfig()
    now.model.hidden_size = 256
    now.model.seq_length = 256
    now.training.train_steps = 200
    now.data.train_paths = ["other"]
    with pytest.raises(ConfigError) as err:
        _check(saved, now, vocab=(96, 128))
    text = str(err.value)
    assert "5 difference(s)" in text
    for line in ("model.hidden_size: 128 -> 256 cannot change on resume",
                 "model.seq_length: 128 -> 256 cannot change on resume",
                 "vocab_size: 96 -> 128 cannot change on resume",
                 "training.train_steps: 100 -> 200 changes the run: allow it with "
                 "checkpoint.allow_changes=[training.train_steps]",
                 "data.train_paths: [] -> ['other'] changes the run: allow it with "
                 "checkpoint.allow_changes=[data.train_paths]"):
        assert line in text


def test_allowed_and_free_changes():
    saved, now = RunConfig(), RunConfig()
    now.training.train_steps, now.optimizer.lr = 200, 1e-3
    now.parallel.tensor_model_parallel_size, now.training.micro_batch_size = 2, 2
    now.logging.wandb, now.name = False, "other"
    now.checkpoint.allow_changes = ["training.train_steps", "optimizer"]
    accepted = _check(saved, now)
    assert sorted(c.key for c in accepted) == ["optimizer.lr", "training.train_steps"]


def test_the_superposition_phase_cannot_restart():
    saved, now = RunConfig(), RunConfig()
    for c in (saved, now):
        c.tst.bag_size = 2
    saved.tst.superposition_steps, now.tst.superposition_steps = 2, 6
    now.checkpoint.allow_changes = ["tst"]
    with pytest.raises(ConfigError, match="a run cannot go back to superposition"):
        _check(saved, now, step=4, phase="recovery")
    _check(saved, now, step=1, phase="superposition")  # still in phase 1: a longer phase 1 is fine


def test_unknown_allow_changes_entry_is_a_config_error():
    from megatron_tst.config import load_config

    with pytest.raises(ConfigError, match="'training.train_stepz' is not a recipe key"):
        load_config(None, ["data.source=demo", "checkpoint.allow_changes=[training.train_stepz]"])


@pytest.mark.newest_line
def test_longer_run_on_resume_rebuilds_the_schedule(tiny_recipe, tmp_path):
    """Extend a 6-step run to 10 steps: refused until allowed, then the LR schedule follows
    the new length from the resumed step."""
    run = tmp_path / "run"
    run_cli(["train", str(tiny_recipe), f"run_dir={run}", *TST, "training.exit_at_step=4"])
    longer = ["train", str(tiny_recipe), f"run_dir={run}", *TST, "training.train_steps=10"]
    refused = run_cli(longer, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "checkpoint.allow_changes=[training.train_steps]" in refused.stderr
    run_cli([*longer, "checkpoint.allow_changes=[training.train_steps]"])
    lrs = {r["step"]: r["lr"] for r in read_metrics(run)}
    # WSD over 10 steps: decay over the last 5 (decay_fraction 0.5), so step 5 is still at the
    # peak; the 6-step schedule would already be decaying there.
    peak = lrs[3]
    assert lrs[5] == pytest.approx(peak) and lrs[10] < lrs[7] < peak
    events = (run / "metrics.jsonl").read_text()
    assert "resumed with training.train_steps: 6 -> 10" in events
