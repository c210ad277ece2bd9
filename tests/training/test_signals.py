"""Exit signals: a signal to one rank of a real 2-process run stops every rank at the same step,
after a checkpoint; the resumed run continues exactly where an uninterrupted run would be."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from megatron_tst.config import ConfigError, load_config
from megatron_tst.training.signals import EXIT_PREEMPTED, signal_number
from tests.conftest import REPO, _free_port, read_metrics, run_cli, wait_for_step


def test_signal_names_and_config_validation(tiny_recipe):
    assert signal_number("SIGUSR1") == signal_number("usr1") == signal.SIGUSR1
    with pytest.raises(ConfigError, match="training.exit_signals.*unknown signal 'SIGFOO'"):
        load_config(str(tiny_recipe), ["training.exit_signals=[SIGTERM,SIGFOO]"])


@pytest.mark.newest_line
def test_signal_to_one_rank_saves_stops_all_and_resumes_exactly(tiny_recipe, tmp_path):
    common = ["train", str(tiny_recipe), "training.train_steps=40", "training.eval_interval=0",
              "schedule.decay_fraction=0.2", "tst.bag_size=2", "tst.ratio=0.5"]
    reference = tmp_path / "reference"
    run_cli([*common, f"run_dir={reference}", "checkpoint.save_final=false"], nproc=2)

    run_dir = tmp_path / "signalled"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "megatron_tst.cli",
           *common, f"run_dir={run_dir}", "checkpoint.save_interval=2", "checkpoint.keep_last=0"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, 3, [proc])  # after the periodic checkpoint of step 2
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        # One rank only (the ranks must agree), to its whole process group as torchrun and
        # Slurm deliver it: megatron's checkpoint writer helper started by the step-2 save is in
        # that group and must survive to write the signal's checkpoint.
        os.killpg(os.getpgid(workers[0].pid), signal.SIGUSR1)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0  # torchrun turns the workers' status 75 into its own failure
    assert "SIGUSR1 received: saving at step" in out
    status = json.loads((run_dir / "exit_status.json").read_text())
    stopped = status["step"]
    assert status["status"] == "preempted" and status["signal"] == "SIGUSR1", status
    assert 3 <= stopped < 40 and status["checkpoint"].endswith(f"step_{stopped:07d}"), status
    assert read_metrics(run_dir)[-1]["step"] == stopped

    # Resume (checkpoint.load: auto) to the end: same losses as the uninterrupted run.
    run_cli([*common, f"run_dir={run_dir}"], nproc=2)
    assert json.loads((run_dir / "exit_status.json").read_text())["status"] == "finished"
    ref = {r["step"]: r["loss"] for r in read_metrics(reference)}
    resumed = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    assert sorted(resumed) == sorted(ref) == list(range(1, 41))
    assert resumed == ref


def test_single_process_sigterm_exits_75(tiny_recipe, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_tst.cli", "train", str(tiny_recipe),
         "training.train_steps=40", "training.eval_interval=0", f"run_dir={run_dir}"],
        cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(run_dir, 2, [proc])
        assert json.loads((run_dir / "exit_status.json").read_text())["status"] == "running"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert status["status"] == "preempted" and status["signal"] == "SIGTERM"
    assert f"stopped by SIGTERM at step {status['step']}" in out
