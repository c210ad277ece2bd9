"""The Slurm scripts across two nodes: ``local-cluster.sh start DIR --nodes 2`` runs each slurmd
in network, UTS and mount namespaces of its own (its hostname, its address on a bridge, the
cluster's /etc/hosts), so ``train.sbatch`` and ``launch.sh`` run as on a real cluster: one
torchrun agent per node, the rendezvous at the first node's hostname, gloo between the
nodes' addresses. One process per node, the demo recipe with TST:

- DP=2 across the nodes runs both phases with the losses of a single-host 2-process run, step
  for step, its ranks talking over the bridge; TP=2 across the nodes likewise;
- ``scontrol requeue`` in the superposition phase, and the ``--signal=B:USR1@T`` time-limit
  warning (sent to the agent of each node), end in a checkpoint, a requeue and a resume;
- kill -9 of one node's torchrun agent ends the workers on both nodes within seconds (the
  orphaned worker ends itself: training/distributed.py ``watch_launcher``) and the in-job
  restart starts both nodes again from the last checkpoint, with unchanged losses;
- ``submit.sh --chain`` runs the two phases as dependent two-node jobs.

Slow (about 12 minutes on 2 cores): ``python -m pytest -q -m slow tests/scripts/test_slurm_two_nodes.py``.
Needs root, ``apt-get install -y slurm-wlm munge iproute2``, and a kernel that allows network
namespaces; skipped when Slurm is not installed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics, run_cli
from tests.scripts.test_slurm import (_MISSING, OVERRIDES, RECIPE, SLURM_DIR, STEPS,
                                      SUPERPOSITION_STEPS, _assert_same_losses, _processes,
                                      _resumed_step, _wait_for_step, _worker_pids,
                                      local_cluster, reference, time_limited_run)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),  # a hang guard: 2-10 minutes each on 2 cores, more when loaded
    pytest.mark.skipif(bool(_MISSING), reason=f"Slurm is not installed ({', '.join(_MISSING)} "
                       f"missing): apt-get install -y slurm-wlm munge"),
]
__all__ = ["reference"]  # the single-host 2-process run of test_slurm.py, a fixture here too
NODES = ["tstlocaln1", "tstlocaln2"]


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(nodes=2, nproc=1) as c:
        yield c


def addresses(cluster) -> dict[str, str]:
    """{hostname: address} from the cluster's hosts file (what the nodes resolve)."""
    pairs = [line.split() for line in (cluster.dir / "hosts").read_text().splitlines()]
    return {name: addr for addr, name in pairs}


def established(pid: int) -> set[tuple[str, str]]:
    """(local, remote) addresses of the TCP connections of ``pid``, seen in its namespace."""
    def ip(field: str) -> str:
        h = field.split(":")[0]
        return ".".join(str(int(h[i:i + 2], 16)) for i in (6, 4, 2, 0))

    rows = [r.split() for r in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]]
    return {(ip(r[1]), ip(r[2])) for r in rows if r[3] == "01"}


def agent_pid(run_dir: Path, node: int) -> int:
    """The torchrun agent of ``node`` (SLURM_NODEID) for ``run_dir``."""
    for pid, cmd, env in _processes(run_dir):
        if b"torch.distributed.run" in cmd and f"SLURM_NODEID={node}".encode() in env:
            return pid
    raise AssertionError(f"no torchrun agent of node {node} for {run_dir}")


def _log_checks(log: str) -> None:
    for rank, node in enumerate(NODES):
        assert f"launch.sh: node {rank}/2 on {node}: 1 processes, master {NODES[0]}:" in log, log


def test_data_parallel_across_two_nodes_matches_one_host(cluster, reference):
    run_dir = cluster.work / "dp"
    job_id = cluster.sbatch("--nodes=2", "--job-name=dp", str(SLURM_DIR / "train.sbatch"),
                            RECIPE, *OVERRIDES, f"run_dir={run_dir}")
    _wait_for_step(cluster, job_id, run_dir, 5)
    # rank 1 (the second node) talks to the first node's address over the bridge
    addr = addresses(cluster)
    workers = _worker_pids(run_dir)
    assert sorted(workers) == [0, 1], workers
    links = established(workers[1])
    assert (addr[NODES[1]], addr[NODES[0]]) in links, (links, addr)
    job = cluster.wait_done(job_id)
    assert job["JobState"] == "COMPLETED" and job["NumNodes"] == "2", cluster.diagnose(job_id)
    log = cluster.job_log(job_id)
    _log_checks(log)
    assert re.search(r"job \d+ start \(restart 0\) on 2 node\(s\) \[tstlocaln\[1-2\]\]", log)
    _assert_same_losses(run_dir, reference)


def test_tensor_parallel_across_two_nodes_matches_one_host(cluster, tmp_path):
    steps = 40  # TST steps 1-12, then recovery
    tp = [f"training.train_steps={steps}", "training.micro_batch_size=16",
          f"training.eval_interval={steps}", "logging.wandb=false",
          "parallel.tensor_model_parallel_size=2"]
    one_host = tmp_path / "one-host"
    run_cli(["train", RECIPE, *tp, f"run_dir={one_host}"], nproc=2, timeout=1200)
    run_dir = cluster.work / "tp"
    job_id = cluster.sbatch("--nodes=2", "--job-name=tp", str(SLURM_DIR / "train.sbatch"),
                            RECIPE, *tp, f"run_dir={run_dir}")
    job = cluster.wait_done(job_id, timeout=1200)
    assert job["JobState"] == "COMPLETED", cluster.diagnose(job_id)
    _log_checks(cluster.job_log(job_id))
    got, want = ({r["step"]: r["loss"] for r in read_metrics(d)} for d in (run_dir, one_host))
    assert sorted(got) == list(range(1, steps + 1)) and got == want
    assert read_metrics(run_dir, "valid")[-1]["loss"] == read_metrics(one_host, "valid")[-1]["loss"]
    assert "TP 2 x PP 1 x DP 1" in cluster.job_log(job_id)


def test_requeue_in_the_superposition_phase_resumes_on_both_nodes(cluster, reference):
    run_dir = cluster.work / "requeue"
    job_id = cluster.sbatch("--nodes=2", "--job-name=requeue", str(SLURM_DIR / "train.sbatch"),
                            RECIPE, *OVERRIDES, f"run_dir={run_dir}")
    _wait_for_step(cluster, job_id, run_dir, 10)  # superposition: steps 1-36
    cluster.run("scontrol", "requeue", job_id)
    cluster.wait(job_id, lambda j: j["Restarts"] == "1", "requeued", timeout=300)
    job = cluster.wait_done(job_id, timeout=900)
    log = cluster.job_log(job_id)
    assert job["JobState"] == "COMPLETED" and job["NumNodes"] == "2", cluster.diagnose(job_id)
    stopped = re.search(rf"exit status: preempted at step (\d+) of {STEPS} \(signal SIGTERM", log)
    assert stopped and 10 <= int(stopped.group(1)) < SUPERPOSITION_STEPS, log
    assert _resumed_step(run_dir) == int(stopped.group(1))
    assert log.count("launch.sh: node 1/2 on tstlocaln2") == 2  # both starts, both nodes
    _assert_same_losses(run_dir, reference)


def test_time_limit_warning_reaches_both_agents_and_requeues(cluster):
    _, log = time_limited_run(cluster, cluster.work / "timelimit", "--nodes=2", timeout=400)
    for node in NODES:
        assert f"signal-agents.sh: SIGUSR1 sent to 1 agent(s) on {node}" in log, log


def test_a_killed_agent_ends_both_nodes_and_the_job_restarts_itself(cluster, reference):
    run_dir = cluster.work / "agent-kill"
    job_id = cluster.sbatch("--nodes=2", "--job-name=agent-kill",
                            "--export=ALL,MEGATRON_TST_MAX_RESTARTS=1",
                            str(SLURM_DIR / "train.sbatch"), RECIPE, *OVERRIDES,
                            "checkpoint.save_interval=10", f"run_dir={run_dir}")
    _wait_for_step(cluster, job_id, run_dir, 15)  # after the save at step 10, in phase 1
    workers = _worker_pids(run_dir)
    killed = time.time()
    os.kill(agent_pid(run_dir, node=1), signal.SIGKILL)
    deadline = killed + 120  # both workers end within seconds: the bound of a hang guard
    while any(Path(f"/proc/{p}").exists() for p in workers.values()) and time.time() < deadline:
        time.sleep(0.2)
    ended = time.time() - killed
    assert not any(Path(f"/proc/{p}").exists() for p in workers.values()), \
        f"workers still running {ended:.0f} s after the agent's death\n{cluster.diagnose(job_id)}"
    job = cluster.wait_done(job_id, timeout=900)
    log = cluster.job_log(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "0", cluster.diagnose(job_id)
    assert "the launcher that started this process (torchrun agent" in log, log
    for node in (0, 1):
        assert f"launch.sh: node {node}: training crashed" in log and \
            "in-job restart 1 of 1, resuming from the latest checkpoint" in log, log
    resumed = _resumed_step(run_dir)
    assert resumed in (10, 20, 30), resumed  # the latest checkpoint at the kill
    assert json.loads((run_dir / "exit_status.json").read_text())["status"] == "finished"
    train = {r["step"]: r["loss"] for r in read_metrics(run_dir)}  # the last record of each step
    assert sorted(train) == list(range(1, STEPS + 1)) and train == reference["train"]
    assert read_metrics(run_dir, "valid")[-1]["loss"] == reference["valid"]
    print(f"agent kill: workers on both nodes ended {ended:.1f} s after the agent's death; "
          f"restarted in the job, resumed from step {resumed}; losses unchanged")


def test_submit_chains_the_phases_as_two_node_jobs(cluster, reference):
    run_dir = cluster.work / "phases"
    out = cluster.run(str(SLURM_DIR / "submit.sh"), "--chain", "--nodes=2", RECIPE, *OVERRIDES,
                      f"run_dir={run_dir}")
    phase1, phase2 = out.stdout.split()
    job1 = cluster.wait_done(phase1, timeout=900)
    job2 = cluster.wait_done(phase2, timeout=900)
    assert job1["JobState"] == job2["JobState"] == "COMPLETED", \
        cluster.diagnose(phase1) + cluster.diagnose(phase2)
    assert job1["NumNodes"] == job2["NumNodes"] == "2"
    assert f"exit status: stopped at step {SUPERPOSITION_STEPS} of {STEPS}" in \
        cluster.job_log(phase1)
    _log_checks(cluster.job_log(phase2))
    assert _resumed_step(run_dir) == SUPERPOSITION_STEPS
    _assert_same_losses(run_dir, reference)


def documented_block() -> list[str]:
    """The shell lines of docs/launching.md's two-node block (continuations joined)."""
    text = (REPO / "docs" / "launching.md").read_text()
    section = text[text.index("### Two nodes in network namespaces"):]
    block = section[section.index("```bash\n") + 8:]
    block = block[:block.index("\n```")]
    return [line for line in block.replace("\\\n", " ").splitlines()
            if line.strip() and not line.startswith("#")]


def test_the_documented_two_node_commands_run_as_written(tmp_path):
    """docs/launching.md's block, line by line in a checkout-like directory, on a cluster of
    its own (its default ports and /tmp/cluster2); the job is waited for before the stop."""
    install, start, export, submit, look, stop = documented_block()
    assert install.startswith("apt-get install") and "--nodes 2" in start
    work = tmp_path / "checkout"
    work.mkdir()
    for name in ("scripts", "configs"):
        (work / name).symlink_to(REPO / name)
    env = {**os.environ, "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin",
           "MEGATRON_TST_PYTHON": sys.executable, "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}

    def sh(*lines: str) -> str:
        res = subprocess.run(["bash", "-ec", "\n".join(lines)], cwd=work, env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{lines}\n{res.stdout}\n{res.stderr}"
        return res.stdout

    try:
        out = sh(start, export, submit)
        assert "nodes tstlocaln1 tstlocaln2 at" in out, out
        job = re.search(r"Submitted batch job (\d+)", out).group(1)
        deadline = time.time() + 900
        while time.time() < deadline and job in sh(export, "squeue -h -o %i").split():
            time.sleep(2)
        out = sh(export, look)
        assert "node 0/2 on tstlocaln1" in out and "node 1/2 on tstlocaln2" in out, out
        assert "run finished" in out, out
        assert [r["step"] for r in read_metrics(work / "runs" / "two-nodes")] == \
            list(range(1, 41))
    finally:
        out = sh(stop)
    assert "stopped" in out
    assert "tstlocaln" not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                             text=True).stdout
