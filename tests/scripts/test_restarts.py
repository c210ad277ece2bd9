"""Restarts after a crash, without Slurm: ``launch.sh`` with ``MEGATRON_TST_MAX_RESTARTS`` restarts
the workers of a 2-rank run after one of them is killed with SIGKILL in the superposition phase,
the restart resumes from ``latest`` and the run ends with the losses of an uninterrupted run.
Two launch.sh instances as two nodes restart together. The Slurm side (``train.sbatch``
requeueing a crash while the checkpoint step advances) runs on a real cluster in test_slurm.py;
its decision alone, with stand-ins for srun and scontrol, is the last test here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, _free_port, read_metrics, run_cli, write_tiny_recipe

SLURM_DIR = REPO / "scripts" / "slurm"
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES", "SLURM_NODEID",
              "SLURM_STEP_ID", "SLURM_CONF", "SLURM_RESTART_COUNT")

STEPS, SUPERPOSITION, SAVE_EVERY = 40, 30, 5
OVERRIDES = [f"training.train_steps={STEPS}", "training.eval_interval=0",
             "schedule.warmup_steps=2", "tst.bag_size=4", "tst.ratio=null",
             f"tst.superposition_steps={SUPERPOSITION}", f"checkpoint.save_interval={SAVE_EVERY}",
             "checkpoint.keep_last=2"]


def _last_loss_per_step(run_dir: Path) -> dict[int, float]:
    """The loss of each step, the last record of it (steps after the last checkpoint before a
    crash are trained again after the restart)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def _descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of ``pid`` (launch.sh -> torchrun agent -> workers)."""
    out = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            out += [child, *_descendants(child)]
    return out


def _workers(pid: int) -> dict[int, int]:
    """{global rank: pid} of the training workers under launch.sh ``pid``."""
    found = {}
    for p in _descendants(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"megatron_tst.cli" in cmd and b"torch.distributed.run" not in cmd:
            rank = _rank_of(p)
            if rank is not None:
                found.setdefault(rank, p)  # the worker, not a helper it forked
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


def _steps_logged(run_dir: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(run_dir)]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []


def launch_env(**extra: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    return {**clean, "MEGATRON_TST_PYTHON": sys.executable, "SLURM_JOB_ID": "4343",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
            "MEGATRON_TST_NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1",
            "WANDB_MODE": "disabled", **extra}


def test_max_restarts_is_validated(tmp_path):
    for bad in ("-1", "two", "1.5", "1000"):
        result = subprocess.run([str(SLURM_DIR / "launch.sh"), str(REPO / "configs/demo-cpu.yaml")],
                                env=launch_env(MEGATRON_TST_MAX_RESTARTS=bad), cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, (bad, result.stderr)
        assert f"MEGATRON_TST_MAX_RESTARTS must be a non-negative integer below 1000 (in-job " \
               f"restarts after a worker crash), got '{bad}'" in result.stderr


@pytest.mark.slow  # about 2 minutes on 2 cores
def test_killed_worker_restarts_in_job_with_uninterrupted_losses(tmp_path, synthetic_data):
    """kill -9 global rank 0 (the holder of the run lock) of a 2-rank run in the superposition
    phase, after a checkpoint: launch.sh starts torchrun again (MEGATRON_TST_MAX_RESTARTS=1), both
    workers resume from `latest` and finish with the losses of an uninterrupted 2-rank run."""
    t0 = time.time()
    recipe = write_tiny_recipe(tmp_path, synthetic_data)
    ref_dir = tmp_path / "reference"
    run_cli(["train", str(recipe), *OVERRIDES, f"run_dir={ref_dir}"], nproc=2, timeout=900)
    reference = _last_loss_per_step(ref_dir)
    assert sorted(reference) == list(range(1, STEPS + 1))
    t_ref = time.time() - t0

    run_dir = tmp_path / "crash"
    log = tmp_path / "launch.log"
    with open(log, "w") as out:
        agent = subprocess.Popen([str(SLURM_DIR / "launch.sh"), str(recipe), *OVERRIDES,
                                  f"run_dir={run_dir}"], cwd=REPO, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True,
                                 env=launch_env(MEGATRON_TST_MAX_RESTARTS="1"))
    try:
        deadline = time.time() + 600
        while not any(SAVE_EVERY < s for s in _steps_logged(run_dir)):
            assert agent.poll() is None and time.time() < deadline, log.read_text()[-5000:]
            time.sleep(0.05)
        workers = _workers(agent.pid)
        killed_after = max(_steps_logged(run_dir))
        os.kill(workers[0], signal.SIGKILL)
        assert SAVE_EVERY < killed_after < SUPERPOSITION, \
            f"the kill came after step {killed_after}, not in the superposition phase"
        agent.wait(timeout=900)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    text = log.read_text()
    assert agent.returncode == 0, text[-6000:]
    assert "up to 1 in-job restart(s)" in text
    assert "launch.sh: node 0: training crashed (torchrun exit 1, started at step 0): in-job " \
           "restart 1 of 1, resuming from the latest checkpoint" in text, text[-6000:]
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert status["status"] == "finished" and status["step"] == STEPS, status
    resumed = [e for e in read_metrics(run_dir, "event") if e["message"].startswith("resumed from")]
    assert len(resumed) == 1 and 0 < resumed[0]["step"] <= killed_after < SUPERPOSITION, resumed
    got = _last_loss_per_step(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    worst = max(abs(got[s] - reference[s]) / abs(reference[s]) for s in reference)
    print(f"killed rank 0 after step {killed_after} (checkpoint every {SAVE_EVERY}, switch after "
          f"{SUPERPOSITION}), resumed from step {resumed[0]['step']}; max relative loss "
          f"difference to the uninterrupted run {worst:.3g}; reference {t_ref:.0f} s, total "
          f"{time.time() - t0:.0f} s")
    assert got == reference  # bitwise: the resume restores data position, RNG and optimizer


@pytest.mark.slow  # about 2 minutes on 2 cores
def test_two_nodes_restart_together(tmp_path, synthetic_data):
    """Two launch.sh instances as two Slurm nodes (one worker each, MEGATRON_TST_MAX_RESTARTS=1):
    node 1's worker is killed; node 0's worker fails in its next collective, both nodes start
    torchrun again on MASTER_PORT + 1, rendezvous and finish from the checkpoint."""
    recipe = write_tiny_recipe(tmp_path, synthetic_data)
    run_dir = tmp_path / "run"
    port = _free_port()
    nodes, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"node{rank}.log")
        with open(logs[-1], "w") as out:
            nodes.append(subprocess.Popen(
                [str(SLURM_DIR / "launch.sh"), str(recipe), *OVERRIDES, f"run_dir={run_dir}"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env=launch_env(MEGATRON_TST_MAX_RESTARTS="1", SLURM_JOB_NUM_NODES="2",
                               SLURM_NODEID=str(rank), MASTER_PORT=str(port),
                               MEGATRON_TST_NPROC_PER_NODE="1")))
    try:
        deadline = time.time() + 600
        while not any(SAVE_EVERY < s for s in _steps_logged(run_dir)):
            assert all(n.poll() is None for n in nodes) and time.time() < deadline, \
                logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
            time.sleep(0.05)
        killed_after = max(_steps_logged(run_dir))
        os.kill(_workers(nodes[1].pid)[1], signal.SIGKILL)
        for n in nodes:
            n.wait(timeout=900)
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
                n.wait()
    texts = [log.read_text() for log in logs]
    assert [n.returncode for n in nodes] == [0, 0], texts[0][-4000:] + texts[1][-4000:]
    for rank, text in enumerate(texts):
        assert f"launch.sh: node {rank}: training crashed (torchrun exit 1, started at step 0): " \
               f"in-job restart 1 of 1" in text, text[-4000:]
        assert f"(master port {port + 1})" in text
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert status["status"] == "finished" and status["step"] == STEPS, status
    resumed = [e for e in read_metrics(run_dir, "event") if e["message"].startswith("resumed from")]
    assert len(resumed) == 1 and 0 < resumed[0]["step"] <= killed_after, resumed
    assert sorted(_last_loss_per_step(run_dir)) == list(range(1, STEPS + 1))
    print(f"two nodes: killed node 1's worker after step {killed_after}, both nodes restarted, "
          f"resumed from step {resumed[0]['step']}")


# ------------------------------------------------------------------ train.sbatch's crash decision
FAKE_SRUN = """#!/bin/sh
# stands in for `srun ... launch.sh RECIPE ... run_dir=DIR`: leaves what a crash would
for arg in "$@"; do case $arg in run_dir=*) run_dir=${arg#run_dir=};; esac; done
mkdir -p "$run_dir/checkpoints"
printf '%s\\n' "$FAKE_EXIT_STATUS" > "$run_dir/exit_status.json"
[ -z "$FAKE_LATEST" ] || printf 'step_%07d\\n' "$FAKE_LATEST" > "$run_dir/checkpoints/latest"
exit 1
"""
FAKE_SCONTROL = """#!/bin/sh
case "$1" in
    show) echo localhost ;;
    requeue) echo "$2" >> "$FAKE_REQUEUED" ;;
esac
"""


def _status(status: str, step: int, reason: str | None = None) -> str:
    return json.dumps({"status": status, "step": step, "train_steps": 100, "checkpoint": None,
                       "signal": None, "reason": reason})


@pytest.mark.parametrize("state, exit_status, latest, requeued, message", [
    (None, _status("running", 0), 10, True,
     "training crashed in its loop (started at step 0; exit_status.json still says running): "
     "crash requeue 1 of 3, requeueing job 77 to resume from the latest checkpoint (step 10)"),
    ({"job": "77", "crash_requeues": 1, "checkpoint_step": 10}, _status("running", 10), 10, False,
     "giving up: training crashed in its loop (started at step 10; exit_status.json still says "
     "running) again without progress: the latest checkpoint is still step 10, as at the "
     "previous crash (crash requeue 1 of 3): not requeueing"),
    ({"job": "77", "crash_requeues": 1, "checkpoint_step": 10}, _status("running", 10), 20, True,
     "crash requeue 2 of 3, requeueing job 77 to resume from the latest checkpoint (step 20)"),
    ({"job": "77", "crash_requeues": 3, "checkpoint_step": 10}, _status("running", 10), 20, False,
     "giving up: training crashed in its loop (started at step 10; exit_status.json still says "
     "running); already requeued after 3 crash(es) (MEGATRON_TST_MAX_CRASH_REQUEUES=3)"),
    ({"job": "12", "crash_requeues": 3, "checkpoint_step": 10}, _status("running", 10), 10, True,
     "crash requeue 1 of 3"),  # another job's record: a resubmission starts afresh
    ("{not json", _status("running", 0), None, True, "treated as no previous crash"),
    (None, _status("failed", 30, "hang"), 30, True,
     "training hung at step 30 (hang watchdog; stacks in"),
    (None, _status("failed", 30, "nonfinite"), 30, False,
     "training stopped itself at step 30 (reason nonfinite, checkpoint -): not requeueing"),
])
def test_sbatch_requeues_a_crash_only_while_it_progresses(tmp_path, state, exit_status, latest,
                                                         requeued, message):
    """train.sbatch's decision after a crash, with stand-ins for srun and scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if state is not None:
        (run_dir / "requeue_state.json").write_text(
            state if isinstance(state, str) else json.dumps(state))
    clean = {k: v for k, v in os.environ.items() if k not in SLURM_VARS}
    env = {**clean, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1",
           "MEGATRON_TST_HOME": str(REPO), "MEGATRON_TST_PYTHON": sys.executable,
           "FAKE_EXIT_STATUS": exit_status, "FAKE_LATEST": "" if latest is None else str(latest),
           "FAKE_REQUEUED": str(tmp_path / "requeued")}
    result = subprocess.run(["bash", str(SLURM_DIR / "train.sbatch"),
                             str(REPO / "configs" / "demo-cpu.yaml"), f"run_dir={run_dir}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    assert message in out, out
    assert (tmp_path / "requeued").exists() == requeued, out
    assert result.returncode == (0 if requeued else 1), out
    if requeued and "hang" not in exit_status:
        saved = json.loads((run_dir / "requeue_state.json").read_text())
        assert saved["job"] == "77" and saved["checkpoint_step"] == (latest or 0), saved
