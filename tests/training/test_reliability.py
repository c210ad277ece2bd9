"""Hostile cases, as real commands: a refused resume writes nothing, one run per run directory,
damaged checkpoints are refused (or skipped by a resume), signals are honoured inside an
evaluation, a full disk ends a save cleanly, skipped non-finite steps are bounded."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_tst.config import ConfigError, load_config
from megatron_tst.training.faults import EXIT_NONFINITE
from megatron_tst.training.signals import EXIT_PREEMPTED
from tests.conftest import read_metrics, run_cli

SHORT = ["training.train_steps=4", "training.eval_interval=0", "schedule.warmup_steps=1",
         "checkpoint.save_interval=2", "checkpoint.keep_last=0"]


def snapshot(root: Path) -> dict:
    """Every file under ``root`` (but the run lock, which records its last holder) by content
    and modification time."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "run.lock"}


def one_line(res) -> str:
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("megatron-tst: ") and "Traceback" not in res.stderr, res.stderr[-3000:]
    return err


def flip_bytes(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_refused_resume_writes_nothing(tiny_recipe, tmp_path):
    """The demo data, megatron's index cache, run_config.yaml, metrics: all as they were."""
    run = tmp_path / "run"
    demo = ["data.source=demo", "data.demo_vocab_size=512", "data.train_paths=[]",
            "data.valid_paths=[]"]
    run_cli(["train", str(tiny_recipe), f"run_dir={run}", *SHORT, *demo])
    before = snapshot(run)
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *SHORT, *demo[:1],
                   "data.demo_vocab_size=600", *demo[2:]], check=False)
    assert res.returncode == 2 and "data.demo_vocab_size: 512 -> 600" in one_line(res)
    assert snapshot(run) == before


@pytest.mark.oldest_line
def test_one_run_per_run_directory_and_stale_locks_do_not_block(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "megatron_tst.cli", "train", str(tiny_recipe),
            f"run_dir={run}", "training.train_steps=100000", "training.eval_interval=0",
            "schedule.warmup_steps=1", "checkpoint.save_final=false"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (run / "metrics.jsonl").is_file() or not read_metrics(run):
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.5)
        tic = time.time()
        res = run_cli(["train", str(tiny_recipe), f"run_dir={run}"], check=False)
        assert res.returncode == 2
        assert f"is in use by another training run (pid {first.pid} on" in one_line(res)
        assert time.time() - tic < 120  # before any set-up (generous for a loaded machine)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # dies holding the lock
        first.wait()
    # The kernel dropped the dead holder's lock: a resume (from scratch here) just runs.
    run_cli(["train", str(tiny_recipe), f"run_dir={run}", *SHORT])
    assert json.loads((run / "exit_status.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_damaged_checkpoints_are_refused_and_skipped_by_a_resume(tiny_recipe, tmp_path,
                                                                 synthetic_data):
    run = tmp_path / "run"
    run_cli(["train", str(tiny_recipe), f"run_dir={run}", *SHORT])
    root = run / "checkpoints"
    shard = max((root / "step_0000004").glob("*.distcp"), key=lambda p: p.stat().st_size)
    flip_bytes(shard, shard.stat().st_size // 2)
    for cmd in (["eval", str(root), "--data", synthetic_data["valid"]],
                ["export", str(root / "step_0000004"), "--to", "hf", str(tmp_path / "hf")],
                ["inspect", str(root)],
                ["train", str(tiny_recipe), f"run_dir={run}", *SHORT,
                 f"checkpoint.load={root / 'step_0000004'}"]):
        res = run_cli(cmd, check=False)
        assert res.returncode == 2, cmd
        assert f"step_0000004 is damaged: {shard.name} has changed" in one_line(res), cmd
    # auto: the damaged newest one is named and skipped for the newest intact one
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *SHORT[1:],
                   "training.train_steps=6", "checkpoint.allow_changes=[training.train_steps]"])
    assert "resuming from step_0000002, the newest intact checkpoint" in res.stdout + res.stderr
    assert [r["step"] for r in read_metrics(run)][-4:] == [3, 4, 5, 6]


@pytest.mark.oldest_line
def test_a_damaged_latest_marker_is_treated_as_missing(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    run_cli(["train", str(tiny_recipe), f"run_dir={run}", *SHORT])
    for garbage in (b"\xff\xfe\x00", b"", b"../../etc"):
        (run / "checkpoints" / "latest").write_bytes(garbage)
        res = run_cli(["inspect", str(run / "checkpoints")])
        assert json.loads(res.stdout)["train_state"]["step"] == 4
        assert "ignoring it and resuming from the newest complete checkpoint" in res.stderr


def test_bad_load_paths_and_signals_fail_at_once(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}",
                   f"checkpoint.load={tmp_path / 'nonexistent' / 'x'}"], check=False)
    assert res.returncode == 2 and "nonexistent/x does not exist" in one_line(res)
    assert not run.exists()  # refused before anything was written
    for name in ("SIGKILL", "STOP"):
        with pytest.raises(ConfigError, match="cannot be caught by any process"):
            load_config(str(tiny_recipe), [f"training.exit_signals=[{name}]"])
    (tmp_path / "file").write_text("")
    res = run_cli(["train", str(tiny_recipe), f"run_dir={tmp_path / 'file' / 'run'}"],
                  check=False)
    assert res.returncode == 2 and "cannot create the run directory" in one_line(res)


def test_unwritable_outputs_and_unreadable_checkpoints_are_one_line(tmp_path, synthetic_data):
    """preprocess into a location that cannot be written (a path under a file: root ignores
    permission bits); inspect of a directory whose metadata.json is not text."""
    (tmp_path / "file").write_text("")
    (tmp_path / "in.jsonl").write_text('{"text": "hello world"}\n')
    res = run_cli(["preprocess", "--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                   str(tmp_path / "file" / "out"), "--tokenizer-model",
                   synthetic_data["tokenizer"]], check=False)
    err = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and "cannot write" in err and "Traceback" not in res.stderr
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "metadata.json").write_bytes(b"\x80\xff\x00binary")
    res = run_cli(["inspect", str(bad)], check=False)
    assert res.returncode == 2 and "not a complete megatron-tst checkpoint" in one_line(res)
    (bad / "checkpoint.json").write_text('{"format_version": 1}')
    res = run_cli(["inspect", str(bad)], check=False)
    assert res.returncode == 2 and "cannot read the common state" in one_line(res)


@pytest.mark.slow
def test_a_signal_during_evaluation_stops_within_one_batch(tiny_recipe, tmp_path):
    """SIGTERM at the first of 500 validation batches (the eval:signal failpoint): the
    evaluation is abandoned (no validation record), the step is saved, exit 75."""
    run = tmp_path / "run"
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}", "training.eval_interval=2",
                   "training.eval_steps=500", "schedule.warmup_steps=1"],
                  env={"MEGATRON_TST_FAILPOINT": "eval:signal@2"}, check=False)
    assert res.returncode == EXIT_PREEMPTED, res.stderr[-2000:]
    status = json.loads((run / "exit_status.json").read_text())
    assert (status["status"], status["signal"], status["step"]) == ("preempted", "SIGTERM", 2)
    assert read_metrics(run, "valid") == []
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"


@pytest.mark.slow
def test_a_full_disk_ends_the_save_cleanly(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *SHORT],
                  env={"MEGATRON_TST_FAILPOINT": "save:disk_full@4"}, check=False)
    assert res.returncode == 1
    assert "no space left on the device of" in one_line(res)
    status = json.loads((run / "exit_status.json").read_text())
    assert (status["status"], status["reason"], status["step"]) == ("failed", "disk_full", 4)
    root = run / "checkpoints"
    assert not (root / "step_0000004").exists()
    assert (root / "latest").read_text().strip() == "step_0000002"


@pytest.mark.slow
def test_skipped_steps_are_bounded_reported_and_keep_the_last_good_checkpoint(tiny_recipe,
                                                                               tmp_path):
    """A NaN at every step from step 3 on: two skips are allowed in a row, the third stops the
    run as nonfinite; keep_last=1 still keeps step 2, saved before the skips."""
    run = tmp_path / "run"
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}", "training.train_steps=8",
                   "training.eval_interval=0", "schedule.warmup_steps=1",
                   "checkpoint.save_interval=2", "checkpoint.keep_last=1",
                   "training.nonfinite=skip", "training.max_consecutive_skips=2"],
                  env={"MEGATRON_TST_FAILPOINT": "grad:nan@3+"}, check=False)
    assert res.returncode == EXIT_NONFINITE, res.stderr[-2000:]
    status = json.loads((run / "exit_status.json").read_text())
    assert (status["status"], status["reason"], status["skipped_steps"]) == \
        ("failed", "nonfinite", 3)
    assert "training.max_consecutive_skips=2" in res.stdout + res.stderr
    assert "skipped steps         3" in res.stdout
    names = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert names == ["step_0000002", "step_0000004"]
