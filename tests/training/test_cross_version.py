"""Checkpoints across the supported megatron-core lines. A run saved under 0.16.1 resumes under 0.19.2
(and each line resumes its own), in the superposition phase and in the recovery phase, and trains
on exactly like the run that wrote it; a 0.19.2 checkpoint under 0.16.1, which cannot read its
layout, is refused in one line naming both versions. The checkpoints are fixtures written by each
line (``tests/fixtures/make_checkpoints.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from megatron_tst import mcore
from megatron_tst.training.saved import saved_megatron_core
from tests.conftest import read_metrics, run_cli, write_tiny_recipe
from tests.fixtures.make_checkpoints import FIXTURES, SAVED_STEPS, TST, data_files

WRITERS = sorted(p.name.removeprefix("mcore-") for p in FIXTURES.glob("mcore-*"))
# The data files lie elsewhere than where the fixtures were written: a moved corpus, accepted as
# a user would accept it.
MOVED_DATA = "checkpoint.allow_changes=[data.train_paths,data.tokenizer]"


def test_a_fixture_per_supported_line():
    assert WRITERS == sorted(mcore.TESTED.values())


@pytest.mark.parametrize("step", SAVED_STEPS, ids=["superposition", "recovery"])
@pytest.mark.parametrize("writer", WRITERS)
def test_resume_a_checkpoint_of_each_line(tmp_path, writer, step):
    fixture = FIXTURES / f"mcore-{writer}"
    saved = fixture / f"step_{step:07d}"
    assert saved_megatron_core(saved) == writer
    expected = json.loads((fixture / "losses.json").read_text())["train_loss"]
    ckpt = tmp_path / "run" / "checkpoints" / saved.name
    shutil.copytree(saved, ckpt)  # resuming writes next to it; the fixture stays untouched
    recipe = write_tiny_recipe(tmp_path, data_files())
    args = ["train", str(recipe), *TST, f"checkpoint.load={ckpt}", MOVED_DATA,
            "training.eval_interval=0"]
    if mcore.unreadable_checkpoint(writer):  # a newer line's layout: refused in one line
        res = run_cli(args, check=False)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        [line] = [x for x in res.stderr.splitlines() if x.startswith("megatron-tst:")]
        assert f"written by megatron-core {writer}" in line
        assert f"megatron-core {mcore.installed()} cannot read" in line
        assert f"resume it with megatron-core {writer} (Python 3.12" in line
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
        return
    out = run_cli(args)
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run")}
    assert sorted(resumed) == list(range(step + 1, 7))
    phases = [r["phase"] for r in read_metrics(tmp_path / "run")]
    assert phases == ["superposition"] * (3 - step) + ["recovery"] * (6 - max(step, 3))
    # The same fp32 model on the same tokens: the losses of the run that wrote the checkpoint,
    # up to the order of floating-point sums (which may differ between megatron-core releases).
    for s, loss in resumed.items():
        assert loss == pytest.approx(expected[str(s)], rel=1e-5, abs=1e-6), (s, resumed, expected)
    if writer != str(mcore.installed()):
        assert f"written by megatron-core {writer}; loading it with {mcore.installed()}" \
            in out.stdout + out.stderr
