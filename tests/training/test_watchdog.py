"""Hangs: the process-group timeout comes from the recipe, and the hang watchdog ends a run in
which one rank is stopped (SIGSTOP from outside, a real 2-process run) within its timeout, with
every live rank's Python stacks, ``exit_status.json`` (failed, hang) and exit status 76."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from megatron_tst.config import ConfigError, load_config
from megatron_tst.training.distributed import flight_recorder_env
from megatron_tst.training.signals import EXIT_HANG, write_exit_status
from megatron_tst.training.watchdog import HangWatchdog
from tests.conftest import REPO, _free_port, read_metrics, wait_for_step

HANG_MINUTES = 0.25  # 15 s: far above a tiny step, an evaluation batch or a save, even loaded
RUN = ["training.train_steps=400", "training.eval_interval=3", "training.eval_steps=1",
       "checkpoint.save_interval=2", "checkpoint.keep_last=0",
       f"training.hang_timeout_minutes={HANG_MINUTES}"]


# ------------------------------------------------------------------------ in one process
def test_watchdog_fires_dumps_stacks_writes_the_status_and_exits_76(tmp_path):
    exited = []
    done = threading.Event()

    def fake_exit(code):
        exited.append(code)
        done.set()

    dog = HangWatchdog(0.005, tmp_path, rank=3, train_steps=10,  # 0.3 s
                       progress=lambda: (7, str(tmp_path / "checkpoints/step_0000006"), 1),
                       exit=fake_exit)
    try:
        assert done.wait(60), "the watchdog did not fire"  # only a hang guard: fires in ~0.3 s
    finally:
        dog.close()
    assert exited == [EXIT_HANG] == [76] and dog.fired.is_set()
    stacks = (tmp_path / "hang" / "rank3.txt").read_text()
    header = stacks.splitlines()[0]
    assert header.startswith("hang: rank 3 on ") and f"(pid {os.getpid()})" in header
    assert "last completed step 7" in header and "hang_timeout_minutes=0.005" in header
    assert "MainThread" in stacks and "megatron-tst-hang-watchdog" in stacks
    # This (waiting) test function's frame is in the main thread's stack.
    assert "test_watchdog_fires_dumps_stacks" in stacks and "watchdog.py" in stacks
    status = json.loads((tmp_path / "exit_status.json").read_text())
    assert status == {"status": "failed", "step": 7, "train_steps": 10,
                      "checkpoint": str(tmp_path / "checkpoints/step_0000006"), "signal": None,
                      "reason": "hang", "skipped_steps": 1}
    # The training loop's own last write, racing the exit, does not replace it.
    write_exit_status(tmp_path, status="finished", step=8, train_steps=10, checkpoint=None,
                      signal_name=None)
    assert json.loads((tmp_path / "exit_status.json").read_text())["reason"] == "hang"
    assert not list(tmp_path.glob("exit_status.json.tmp*"))


def test_watchdog_does_not_fire_while_beating_and_stops_on_close(tmp_path):
    dog = HangWatchdog(1 / 60, tmp_path, rank=0, train_steps=10,  # 1 s
                       progress=lambda: (0, None, 0), exit=lambda code: pytest.fail("fired"))
    end = time.monotonic() + 3
    while time.monotonic() < end:  # beats 20x more often than the timeout
        dog.beat()
        time.sleep(0.05)
    dog.close()
    assert not dog.fired.is_set() and not dog._thread.is_alive()
    time.sleep(1.5)  # past the timeout: closed, it stays quiet
    assert not dog.fired.is_set() and not (tmp_path / "exit_status.json").exists()
    assert (tmp_path / "hang").is_dir() and not list((tmp_path / "hang").iterdir())


def test_watchdog_off_is_a_no_op(tmp_path):
    dog = HangWatchdog(None, tmp_path / "run", rank=0, train_steps=10,
                       progress=lambda: (0, None, 0), exit=lambda code: pytest.fail("fired"))
    dog.beat()
    dog.close()
    assert not dog.enabled and dog._thread is None and not (tmp_path / "run").exists()
    # With nccl the flight recorder's dump directory is made even without the watchdog.
    HangWatchdog(None, tmp_path / "run", rank=0, train_steps=10,
                 progress=lambda: (0, None, 0), backend="nccl").close()
    assert (tmp_path / "run" / "hang").is_dir()


def test_hang_timeout_is_validated(tiny_recipe):
    with pytest.raises(ConfigError, match="training.hang_timeout_minutes"):
        load_config(str(tiny_recipe), ["training.hang_timeout_minutes=0"])
    with pytest.raises(ConfigError, match="parallel.timeout_minutes"):
        load_config(str(tiny_recipe), ["parallel.timeout_minutes=-1"])
    cfg = load_config(str(tiny_recipe), ["training.hang_timeout_minutes=2.5",
                                         "parallel.timeout_minutes=5"])
    assert cfg.training.hang_timeout_minutes == 2.5 and cfg.parallel.timeout_minutes == 5


def test_flight_recorder_environment_keeps_users_values(tmp_path):
    env = {}
    added = flight_recorder_env(str(tmp_path / "run"), env)
    assert env == added == {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(tmp_path / "run" / "hang" / "nccl_trace_rank_")}
    # A user's or launcher's value wins, under torch's old or new name.
    env = {"TORCH_FR_BUFFER_SIZE": "50", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
           "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_"}
    assert flight_recorder_env(str(tmp_path), env) == {}
    assert env == {"TORCH_FR_BUFFER_SIZE": "50", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
                   "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_"}


# ------------------------------------------------------------------- real 2-process runs
def _worker_env(rank: int, port: int) -> dict:
    """What torchrun gives each worker (the test starts them itself, to see each exit status)."""
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "RANK": str(rank),
            "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _kill_all(procs) -> None:
    for p in procs:
        for sig in (signal.SIGKILL, signal.SIGCONT):  # continued first, a stopped rank would fire
            try:
                os.killpg(p.pid, sig)  # the worker and any helper it started
            except ProcessLookupError:
                pass
        p.wait()


def test_process_group_timeout_comes_from_the_recipe(tmp_path):
    """parallel.timeout_minutes=0.1 (6 s): a collective that one rank never joins fails on the
    other after about 6 s, on the world group and on megatron's groups (torch's default: 30
    minutes). The ranks meet first (a file each), so that the timeout never has to cover one
    rank's slower start on a loaded machine (it applies to the group set-up too)."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys, time
        import torch, torch.distributed as dist
        from megatron.core import parallel_state as ps
        from megatron_tst.config import RunConfig
        from megatron_tst.training.distributed import init_distributed

        cfg = RunConfig()
        cfg.parallel.timeout_minutes = 0.1
        rank, out_dir = int(os.environ["RANK"]), os.path.dirname(sys.argv[1])
        open(os.path.join(out_dir, f"ready{rank}"), "w").close()
        deadline = time.time() + 600
        while not os.path.exists(os.path.join(out_dir, f"ready{1 - rank}")) \
                and time.time() < deadline:
            time.sleep(0.05)
        env = init_distributed(cfg)
        if env.rank == 1:  # joins nothing more; leaves once rank 0 is done
            deadline = time.time() + 300
            while not os.path.exists(sys.argv[1]) and time.time() < deadline:
                time.sleep(0.1)
            os._exit(0)
        out = {}
        for name, group in (("world", None), ("data_parallel", ps.get_data_parallel_group())):
            tic = time.monotonic()
            try:
                dist.all_reduce(torch.ones(1), group=group)
                out[name] = ["completed", time.monotonic() - tic]
            except Exception as err:  # noqa: BLE001
                out[name] = [str(err)[:300], time.monotonic() - tic]
        open(sys.argv[1], "w").write(json.dumps(out))
        os._exit(0)
    """))
    result = tmp_path / "result.json"
    port = _free_port()
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    streams = [open(log, "w") for log in logs]
    procs = [subprocess.Popen([sys.executable, str(script), str(result)], cwd=REPO,
                              env=_worker_env(rank, port), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=streams[rank])
             for rank in (0, 1)]
    try:
        procs[0].wait(timeout=900)  # a hang guard only: rank 0 is done in ~20 s
    finally:
        _kill_all(procs)
        for stream in streams:
            stream.close()
    assert result.exists(), f"rank 0 wrote no result:\n{logs[0].read_text()[-3000:]}"
    out = json.loads(result.read_text())
    print("collective timeouts (s):", {k: round(v[1], 2) for k, v in out.items()})
    for name, (error, seconds) in out.items():
        assert error != "completed" and re.search("time(d)? ?out", error, re.I), (name, error)
        assert 5.5 <= seconds < 120, (name, seconds)  # ~6 s; torch's default would be 1800 s


@pytest.mark.newest_line
def test_sigstopped_rank_ends_the_run_with_stacks_status_and_76(tiny_recipe, tmp_path):
    """Rank 1 stopped after step 3: rank 0 waits in a collective until its watchdog fires."""
    run_dir = tmp_path / "run"
    port = _free_port()
    cmd = [sys.executable, "-m", "megatron_tst.cli", "train", str(tiny_recipe),
           f"run_dir={run_dir}", *RUN]
    logs = [open(tmp_path / f"rank{r}.out", "w+") for r in (0, 1)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=_worker_env(r, port), stdout=logs[r],
                              stderr=subprocess.STDOUT, start_new_session=True)
             for r in (0, 1)]
    try:
        wait_for_step(run_dir, 3, procs)  # after a save (step 2) and an evaluation (step 3)
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped = time.monotonic()
        procs[0].wait(timeout=HANG_MINUTES * 60 * 10)  # a hang guard only
        took = time.monotonic() - stopped
    finally:
        _kill_all(procs)
    out = (tmp_path / "rank0.out").read_text()
    print(f"rank 0 exited {took:.1f} s after SIGSTOP (hang timeout {HANG_MINUTES * 60:.0f} s)")
    assert procs[0].returncode == EXIT_HANG, out[-3000:]
    assert took < HANG_MINUTES * 60 + 30, took  # fires once the timeout has passed

    last = read_metrics(run_dir)[-1]["step"]  # rank 1 (the logging rank) is stopped: final
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert status["status"] == "failed" and status["reason"] == "hang", status
    assert last <= status["step"] <= last + 1, (last, status)  # rank 0's last completed step
    assert re.search(r"step_\d{7}$", status["checkpoint"]), status
    stacks = (run_dir / "hang" / "rank0.txt").read_text()
    assert stacks.startswith("hang: rank 0 on ") and f"last completed step {status['step']}" \
        in stacks
    assert "trainer.py" in stacks and "in fit" in stacks, stacks  # the loop, in a collective
    assert not (run_dir / "hang" / "rank1.txt").exists()  # a stopped rank cannot write
    assert "no training step finished for" in out and "exiting with status 76" in out, out[-3000:]


@pytest.mark.slow
def test_torchrun_job_with_a_stopped_rank_0_ends_with_rank_1s_report(tiny_recipe, tmp_path):
    """Through torchrun, rank 0 (which writes the ordinary exit status) stopped: rank 1 writes
    exit_status.json and exits 76; torchrun SIGKILLs the stopped rank after its 30 s grace and
    exits 1."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(_free_port()), "-m", "megatron_tst.cli", "train",
           str(tiny_recipe), f"run_dir={run_dir}", *RUN]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "torchrun.out", "w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        workers = []
        try:
            wait_for_step(run_dir, 3, [proc])
            workers = psutil.Process(proc.pid).children()
            rank0 = next(p for p in workers if p.environ().get("RANK") == "0")
            rank0.suspend()  # SIGSTOP
            stopped = time.monotonic()
            proc.wait(timeout=(HANG_MINUTES * 60 + 30) * 10)  # a hang guard only
            took = time.monotonic() - stopped
        finally:
            for worker in workers:
                for sig in (signal.SIGKILL, signal.SIGCONT):
                    try:
                        worker.send_signal(sig)
                    except psutil.NoSuchProcess:
                        pass
            _kill_all([proc])
        log.seek(0)
        out = log.read()
    print(f"torchrun exited {took:.1f} s after SIGSTOP (hang timeout {HANG_MINUTES * 60:.0f} s "
          f"+ torchrun's 30 s grace)")
    assert proc.returncode == 1, out[-3000:]
    assert re.search(r"exitcode\s*:\s*76", out), out[-3000:]  # torchrun's report of rank 1
    assert took < HANG_MINUTES * 60 + 30 + 30, took
    status = json.loads((run_dir / "exit_status.json").read_text())
    assert status["status"] == "failed" and status["reason"] == "hang", status
    assert (run_dir / "hang" / "rank1.txt").read_text().startswith("hang: rank 1 on ")
    assert not (run_dir / "hang" / "rank0.txt").exists()
