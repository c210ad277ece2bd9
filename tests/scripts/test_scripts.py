"""The Slurm scripts without Slurm: what they compute from a recipe, the commands submit.sh would
run, and their errors outside a job. The real cluster runs are in test_slurm.py (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

SLURM_DIR = REPO / "scripts" / "slurm"
RECIPE = str(REPO / "configs" / "demo-cpu.yaml")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NODEID",
              "SLURM_STEP_ID", "SLURM_CONF")


def _run(*cmd: str, cwd=REPO, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**clean, "MEGATRON_TST_PYTHON": sys.executable, **env})


def _runinfo(*args: str) -> subprocess.CompletedProcess:
    return _run(sys.executable, str(SLURM_DIR / "runinfo.py"), *args)


def test_runinfo_reads_the_resolved_config(tmp_path):
    assert _runinfo("phase1-steps", RECIPE).stdout.strip() == "90"  # round(0.3 * 300)
    assert _runinfo("phase1-steps", RECIPE, "training.train_steps=120").stdout.strip() == "36"
    assert _runinfo("phase1-steps", RECIPE, "tst.ratio=null",
                    "tst.superposition_steps=50").stdout.strip() == "50"
    assert _runinfo("train-steps", RECIPE).stdout.strip() == "300"
    assert _runinfo("name", RECIPE, "name=x").stdout.strip() == "x"
    assert _runinfo("run-dir", RECIPE, "name=x").stdout.strip() == str(REPO / "runs" / "x")
    assert _runinfo("run-dir", RECIPE, f"run_dir={tmp_path}/r").stdout.strip() == f"{tmp_path}/r"

    baseline = _runinfo("phase1-steps", str(REPO / "configs" / "demo-cpu-baseline.yaml"))
    assert baseline.returncode != 0 and "not a TST run" in baseline.stderr
    bad = _runinfo("run-dir", RECIPE, "optimizer.lrr=1")
    assert bad.returncode == 2 and "did you mean 'optimizer.lr'" in bad.stderr


def test_runinfo_exit_status(tmp_path):
    missing = _runinfo("exit-status", str(tmp_path))
    assert missing.returncode == 3 and "exit_status.json" in missing.stderr
    (tmp_path / "exit_status.json").write_text(json.dumps(
        {"status": "preempted", "step": 23, "train_steps": 120,
         "checkpoint": "/runs/a b/checkpoints/step_0000023", "signal": "SIGUSR1",
         "reason": "signal"}))
    out = _runinfo("exit-status", str(tmp_path)).stdout.split()
    assert out == ["preempted", "23", "120", "SIGUSR1", "/runs/a_b/checkpoints/step_0000023",
                   "signal"]
    (tmp_path / "prev.json").write_text(json.dumps(
        {"status": "finished", "step": 120, "train_steps": 120, "checkpoint": None,
         "signal": None}))
    assert _runinfo("exit-status", str(tmp_path / "prev.json")).stdout.split() == \
        ["finished", "120", "120", "-", "-", "-"]  # no reason field: older trainers


def test_submit_chain_dry_run(tmp_path):
    result = _run(str(SLURM_DIR / "submit.sh"), "--dry-run", "--chain", "--time=10",
                  "--phase2-sbatch=--nodes=2", RECIPE, "training.train_steps=120",
                  f"run_dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("sbatch")]
    assert len(lines) == 2, result.stderr
    phase1, phase2 = lines
    assert "--job-name=demo-cpu-p1 --time=10" in phase1
    assert "training.exit_at_step=36" in phase1 and f"run_dir={tmp_path}/run" in phase1
    assert "--dependency=afterok:DRYRUN-demo-cpu-p1" in phase2 and "--nodes=2" in phase2
    assert "exit_at_step" not in phase2 and f"run_dir={tmp_path}/run" in phase2
    assert "phase 1 (superposition, steps 1-36)" in result.stderr
    assert not (tmp_path / "logs").exists()  # a dry run creates nothing


@pytest.mark.parametrize("args, message", [
    (["--chain", RECIPE, "training.exit_at_step=5"], "--chain sets training.exit_at_step"),
    ([RECIPE, "--time=1"], "sbatch options go before RECIPE"),
    ([RECIPE, "name"], "is not a key=value override"),
    (["configs/none.yaml"], "recipe configs/none.yaml not found"),
])
def test_submit_rejects(args, message):
    result = _run(str(SLURM_DIR / "submit.sh"), "--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_scripts_outside_a_job_say_so(tmp_path):
    launch = _run(str(SLURM_DIR / "launch.sh"), RECIPE)
    assert launch.returncode == 2 and "SLURM_JOB_ID is not set" in launch.stderr
    batch = _run("bash", str(SLURM_DIR / "train.sbatch"), RECIPE)
    assert batch.returncode == 2 and "not inside a Slurm job" in batch.stderr
    signal = _run(str(SLURM_DIR / "signal-agents.sh"), "USR1")
    assert signal.returncode != 0 and "inside a Slurm job" in signal.stderr


def test_launch_builds_the_torchrun_command(tmp_path):
    """launch.sh with a stand-in python that prints its arguments instead of running torchrun."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\ncase \"$1\" in -c) exec {sys.executable} \"$@\";; esac\n"
                    "echo \"$@\"\n")
    fake.chmod(0o755)
    result = _run(str(SLURM_DIR / "launch.sh"), RECIPE, "run_dir=/r", MEGATRON_TST_PYTHON=str(fake),
                  SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node[01-04]", SLURM_JOB_NUM_NODES="4",
                  SLURM_NODEID="2", MASTER_ADDR="node01", SLURM_GPUS_ON_NODE="8")
    assert result.returncode == 0, result.stderr
    cmd = result.stdout.strip().splitlines()[-1]
    assert cmd.startswith("-m torch.distributed.run --nnodes 4 --node-rank 2 --nproc-per-node 8 "
                          "--master-addr node01 --master-port 24242 --max-restarts 0 ")
    assert "--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in cmd
    assert cmd.endswith(f"-m megatron_tst.cli train {RECIPE} run_dir=/r")


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed")
def test_shellcheck_clean():
    scripts = sorted(str(p) for p in SLURM_DIR.glob("*.sh")) + [str(SLURM_DIR / "train.sbatch")]
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_launcher_two_nodes_rendezvous(tiny_recipe, tmp_path):
    """Two launch.sh instances as two Slurm nodes (node ranks 0 and 1, one worker each) on this
    machine: the static rendezvous from the Slurm variables forms one 2-rank job."""
    from tests.conftest import _free_port, read_metrics

    run_dir = tmp_path / "run"
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "MEGATRON_TST_NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    clean = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    cmd = [str(SLURM_DIR / "launch.sh"), str(tiny_recipe), f"run_dir={run_dir}",
           "training.train_steps=2", "training.eval_interval=0", "schedule.warmup_steps=1"]
    nodes = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**clean, "MEGATRON_TST_PYTHON": sys.executable,
                                              **env, "SLURM_NODEID": str(rank)})
             for rank in (0, 1)]
    outs = [n.communicate(timeout=240)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "launch.sh: node 0/2" in outs[0] and "launch.sh: node 1/2" in outs[1]
    assert "world size 2" in outs[0] + outs[1]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
