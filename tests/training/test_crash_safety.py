"""A save killed with SIGKILL at any point never leaves ``latest`` on an incomplete checkpoint;
the resume uses the newest complete one, says which it skipped, and ends exactly where an
uninterrupted run ends. Retention never removes the only complete checkpoint."""

from __future__ import annotations

import json
import signal

import pytest

from megatron_tst.training import checkpoint as ckpt
from tests.conftest import read_metrics, run_cli, write_tiny_recipe

# TST run (switch after step 3), saves at steps 2, 4, 6, keeping one: the crash hits the save of
# step 4, in the recovery phase, after the switch.
COMMON = ["training.eval_interval=0", "checkpoint.save_interval=2", "checkpoint.keep_last=1",
          "tst.bag_size=2", "tst.superposition_steps=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_data):
    root = tmp_path_factory.mktemp("crash")
    recipe = write_tiny_recipe(root, synthetic_data)
    run_cli(["train", str(recipe), *COMMON, f"run_dir={root / 'reference'}"])
    return recipe, {r["step"]: r["loss"] for r in read_metrics(root / "reference")}


# point -> the checkpoint a resume must start from
CASES = {
    "save:before_write": "step_0000002",
    "save:after_write": "step_0000002",
    "save:before_record": "step_0000002",
    "save:before_latest": "step_0000002",
    "save:before_prune": "step_0000004",
    "prune:after_first_delete": "step_0000004",
}


DEFAULT = ("save:after_write", "prune:after_first_delete")  # the others: python -m pytest -m slow


@pytest.mark.newest_line
@pytest.mark.parametrize("point", [
    pytest.param(p, marks=[] if p in DEFAULT else [pytest.mark.slow]) for p in CASES])
def test_killed_save_resumes_from_newest_complete_checkpoint(point, reference, tmp_path):
    assert point in ckpt.FAILPOINTS
    recipe, expected = reference
    run = tmp_path / "run"
    crashed = run_cli(["train", str(recipe), *COMMON, f"run_dir={run}"], check=False,
                      env={"MEGATRON_TST_FAILPOINT": f"{point}@4"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    root = run / "checkpoints"
    resume_from = CASES[point]
    assert (root / "latest").read_text().strip() == resume_from
    assert ckpt.is_complete(root / resume_from)
    assert all(ckpt.is_complete(p) or p.name == "step_0000004" for _, p in ckpt.step_dirs(root))

    resumed = run_cli(["train", str(recipe), *COMMON, f"run_dir={run}"])
    log = resumed.stdout + resumed.stderr
    assert f"resumed from {root / resume_from}" in log
    if resume_from == "step_0000002":
        assert "skipping" in log and "step_0000004" in log
    got = {r["step"]: r["loss"] for r in read_metrics(run)}
    assert got == expected  # every step, bit for bit, the crashed steps redone identically
    assert [p.name for _, p in ckpt.step_dirs(root)] == ["step_0000006"]
    assert json.loads((root / "step_0000006" / ckpt.RECORD).read_text())["format_version"] == 1


def test_retention_counts_complete_checkpoints_only(tmp_path):
    """keep_last=1 with a newer incomplete leftover: the complete one that latest names stays."""
    for step, complete in ((2, True), (4, True), (6, False)):
        d = tmp_path / ckpt.step_dir_name(step)
        d.mkdir()
        if complete:
            (d / ckpt.RECORD).write_text('{"format_version": 1}')
    ckpt._prune(tmp_path, keep_last=1, keep=tmp_path / "step_0000004")
    assert [p.name for _, p in ckpt.step_dirs(tmp_path)] == ["step_0000004"]


def test_pruned_checkpoints_are_renamed_then_deleted_in_the_background(tmp_path):
    """A pruned checkpoint leaves its name in one rename (``.deleting``: never half a checkpoint
    under its own name) and is deleted by a thread; a ``.deleting`` leftover of a killed process
    goes at the next pruning."""
    leftover = tmp_path / f"step_0000001{ckpt.DELETING}"
    (leftover / "sub").mkdir(parents=True)
    (leftover / "sub" / "x.distcp").write_bytes(b"0" * 1000)
    for step in (2, 4):
        d = tmp_path / ckpt.step_dir_name(step)
        d.mkdir()
        (d / ckpt.RECORD).write_text('{"format_version": 1}')
        (d / "__0_0.distcp").write_bytes(b"0" * 1000)
    ckpt._prune(tmp_path, keep_last=1, keep=tmp_path / "step_0000004")
    assert [p.name for _, p in ckpt.step_dirs(tmp_path)] == ["step_0000004"]
    ckpt.wait_for_removals()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004"]


def test_retention_keeps_the_checkpoint_before_skipped_steps(tmp_path):
    """keep_last=1 while non-finite steps are being skipped: the last checkpoint taken before
    the first skip (``protect``) stays, whatever was saved since."""
    for step in (2, 4, 6):
        d = tmp_path / ckpt.step_dir_name(step)
        d.mkdir()
        (d / ckpt.RECORD).write_text('{"format_version": 1}')
    ckpt._prune(tmp_path, keep_last=1, keep=tmp_path / "step_0000006",
                protect=tmp_path / "step_0000002")
    assert [p.name for _, p in ckpt.step_dirs(tmp_path)] == ["step_0000002", "step_0000006"]


def test_unknown_or_newer_format_is_refused(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    run_cli(["train", str(tiny_recipe), f"run_dir={run}", "training.train_steps=2",
             "training.eval_interval=0", "schedule.warmup_steps=1"])
    record = run / "checkpoints" / "step_0000002" / ckpt.RECORD
    record.write_text(json.dumps({"format_version": ckpt.FORMAT_VERSION + 1}))
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}", "training.train_steps=4",
                   "training.eval_interval=0", "schedule.warmup_steps=1"], check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"has checkpoint format {ckpt.FORMAT_VERSION + 1}" in res.stderr
    record.unlink()
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}", "training.train_steps=4",
                   f"checkpoint.load={record.parent}"], check=False)
    assert res.returncode == 2 and "is not a complete megatron-tst checkpoint" in res.stderr
