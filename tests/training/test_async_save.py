"""Background checkpoint saves (``checkpoint.async_save``): what they hold equals a synchronous
save's exactly, a resume from them is bitwise, a kill at any point leaves ``latest`` on a complete
checkpoint, an exit signal waits for the pending save, and a failed write never becomes ``latest``.

The content comparison is the snapshot check: training goes on while the writer writes, so a
writer that read the live tensors (rather than the state at the save) would hold later values.
"""

from __future__ import annotations

import json
import shutil
import signal

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_tst.training import checkpoint as ckpt
from tests.conftest import read_metrics, run_cli

# TST (s=4) with the switch after step 3; a save after every step, all kept
TST = ["tst.bag_size=4", "tst.superposition_steps=3", "training.train_steps=6",
       "training.eval_interval=0", "checkpoint.save_interval=1", "checkpoint.keep_last=0"]
ASYNC = ["checkpoint.async_save=true"]


def losses(run_dir) -> dict:
    """step -> (phase, loss, grad norm); a step redone after a resume counts once, as redone."""
    return {r["step"]: (r["phase"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)}


def content(step_dir, out) -> dict:
    """Everything a checkpoint holds (torch's reader, not megatron's), without the run config,
    which names the run directory and ``checkpoint.async_save``."""
    dcp_to_torch_save(step_dir, out)

    def drop(x):
        if isinstance(x, dict):
            return {k: drop(v) for k, v in x.items() if k != "run_config"}
        return [drop(v) for v in x] if isinstance(x, (list, tuple)) else x
    return drop(torch.load(out, weights_only=False))


def differences(x, y, path="") -> list[str]:
    """Where two checkpoint contents differ: tensors and arrays exactly, the rest by value
    (pickled bytes may differ for equal objects, so files are not compared)."""
    if torch.is_tensor(x):
        return [] if torch.is_tensor(y) and torch.equal(x, y) else [path]
    if isinstance(x, np.ndarray):
        return [] if np.array_equal(x, y) else [path]
    if isinstance(x, dict):
        if set(x) != set(y):
            return [f"{path}: keys {sorted(set(x) ^ set(y))}"]
        return [d for k in x for d in differences(x[k], y[k], f"{path}.{k}")]
    if isinstance(x, (list, tuple)):
        if len(x) != len(y):
            return [f"{path}: length"]
        return [d for i, (a, b) in enumerate(zip(x, y)) for d in differences(a, b, f"{path}[{i}]")]
    return [] if x == y else [path]


def resume_from(run, step: int, target, recipe, extra, nproc=1) -> dict:
    """Continue a copy of ``run``'s checkpoint of ``step`` to the end; its steps."""
    name = ckpt.step_dir_name(step)
    shutil.copytree(run / "checkpoints" / name, target / "checkpoints" / name)
    (target / "checkpoints" / ckpt.LATEST).write_text(name + "\n")
    run_cli(["train", str(recipe), f"run_dir={target}", *extra], nproc=nproc)
    return losses(target)


@pytest.mark.parametrize("nproc, layout", [
    pytest.param(1, [], id="1-process"),
    pytest.param(2, ["parallel.use_distributed_optimizer=true"], id="dp2-distopt",
                 marks=pytest.mark.slow)])
def test_background_saves_equal_synchronous_ones_and_resume_bitwise(tiny_recipe, tmp_path,
                                                                    nproc, layout):
    sync, background = tmp_path / "sync", tmp_path / "async"
    run_cli(["train", str(tiny_recipe), f"run_dir={sync}", *TST, *layout], nproc=nproc)
    # save:slow_copy: on the CPU the copy of the state is then made when the trainer releases
    # it, after the next step's forward and backward, which must not have changed it
    run_cli(["train", str(tiny_recipe), f"run_dir={background}", *TST, *layout, *ASYNC],
            nproc=nproc, env={"MEGATRON_TST_FAILPOINT": "save:slow_copy"})
    expected = losses(sync)
    assert losses(background) == expected
    for step in range(1, 7):
        name = ckpt.step_dir_name(step)
        got = content(background / "checkpoints" / name, tmp_path / f"async{step}.pt")
        want = content(sync / "checkpoints" / name, tmp_path / f"sync{step}.pt")
        assert len(want) > 10 and differences(got, want) == [], step
    events = [r["message"] for r in read_metrics(background, "event")]
    assert sum(m.startswith("saved checkpoint") for m in events) == 6
    assert (background / "checkpoints" / ckpt.LATEST).read_text().strip() == "step_0000006"
    assert not list(background.glob("checkpoints/*/.digests-rank*"))  # read and removed
    for stop in (2, 3, 4):  # before, at and after the switch
        got = resume_from(background, stop, tmp_path / f"from{stop}", tiny_recipe,
                          [*TST, *layout, *ASYNC], nproc)
        assert {s: v for s, v in got.items() if s > stop} == \
            {s: v for s, v in expected.items() if s > stop}, stop


# point -> the checkpoint a resume must start from (saves at every step; the kill hits step 4's)
CASES = {
    "save:before_write": "step_0000003",
    "save:writing": "step_0000003",
    "save:after_write": "step_0000003",
    "save:before_record": "step_0000003",
    "save:before_latest": "step_0000003",
    "save:before_prune": "step_0000004",
}
DEFAULT = ("save:writing", "save:after_write")  # the others: python -m pytest -m slow


@pytest.mark.newest_line
@pytest.mark.parametrize("point", [
    pytest.param(p, marks=[] if p in DEFAULT else [pytest.mark.slow]) for p in CASES])
def test_killed_background_save_leaves_latest_complete(tiny_recipe, tmp_path, point):
    assert point in ckpt.FAILPOINTS
    run, full = tmp_path / "run", tmp_path / "full"
    extra = [*TST, *ASYNC, "checkpoint.keep_last=2"]
    crashed = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *extra], check=False,
                      env={"MEGATRON_TST_FAILPOINT": f"{point}@4"})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    root = run / "checkpoints"
    assert (root / ckpt.LATEST).read_text().strip() == CASES[point]
    assert ckpt.is_complete(root / CASES[point])
    resumed = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *extra])
    assert f"resumed from {root / CASES[point]}" in resumed.stdout + resumed.stderr
    run_cli(["train", str(tiny_recipe), f"run_dir={full}", *extra])
    assert losses(run) == losses(full)  # the redone steps too, bit for bit
    assert [p.name for _, p in ckpt.step_dirs(root)] == ["step_0000005", "step_0000006"]
    assert all(ckpt.is_complete(p) for _, p in ckpt.step_dirs(root))


@pytest.mark.newest_line
def test_exit_signal_waits_for_the_pending_save(tiny_recipe, tmp_path):
    """SIGTERM right after the save of step 3 starts, to the trainer and every process it
    started (as Slurm signals a job step), its writer held back: the writer processes survive,
    the trainer waits for that save, exits 75 with it complete, and the resume continues
    bitwise."""
    run, full = tmp_path / "run", tmp_path / "full"
    extra = [*TST, *ASYNC, "checkpoint.save_interval=3"]
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *extra], check=False,
                  env={"MEGATRON_TST_FAILPOINT": "save:signal@3"})
    assert res.returncode == 75, res.stderr[-3000:]
    log = (run / "logs" / "rank0.log").read_text()
    assert "waiting for the background save of step_0000003" in log
    status = json.loads((run / "exit_status.json").read_text())
    assert (status["status"], status["step"], status["signal"]) == ("preempted", 3, "SIGTERM")
    assert status["checkpoint"] == str(run / "checkpoints" / "step_0000003")
    assert ckpt.is_complete(run / "checkpoints" / "step_0000003")
    run_cli(["train", str(tiny_recipe), f"run_dir={run}", *extra])
    run_cli(["train", str(tiny_recipe), f"run_dir={full}", *extra])
    assert losses(run) == losses(full)


@pytest.mark.newest_line
def test_failed_background_write_never_becomes_latest(tiny_recipe, tmp_path):
    run = tmp_path / "run"
    res = run_cli(["train", str(tiny_recipe), f"run_dir={run}", *TST, *ASYNC,
                   "checkpoint.save_interval=2"], check=False,
                  env={"MEGATRON_TST_FAILPOINT": "save:disk_full@4"})
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-tst: ") and "no space left on the device of" in last, \
        res.stderr[-3000:]
    status = json.loads((run / "exit_status.json").read_text())
    assert (status["status"], status["reason"]) == ("failed", "disk_full")
    root = run / "checkpoints"
    assert not (root / "step_0000004").exists()  # the partial save is removed
    assert (root / ckpt.LATEST).read_text().strip() == "step_0000002"
    assert ckpt.is_complete(root / "step_0000002")


@pytest.mark.slow  # about a minute on 2 cores
def test_background_saves_of_a_router_with_expert_bias_equal_synchronous_ones(tiny_recipe,
                                                                            tmp_path):
    """Aux-loss-free MoE routing updates the expert bias in ``finalize_model_grads``, inside the
    next step's forward-backward call: the delayed copy of the state (``save:slow_copy``) is
    released before it, so every checkpoint holds the bias of its own step."""
    from tests.training.test_moe_router import ROUTER

    sync, background = tmp_path / "sync", tmp_path / "async"
    extra = [*ROUTER, "checkpoint.save_interval=1", "checkpoint.keep_last=0"]
    run_cli(["train", str(tiny_recipe), f"run_dir={sync}", *extra])
    run_cli(["train", str(tiny_recipe), f"run_dir={background}", *extra, *ASYNC],
            env={"MEGATRON_TST_FAILPOINT": "save:slow_copy"})
    assert losses(background) == losses(sync)
    for step in range(1, 7):
        name = ckpt.step_dir_name(step)
        got = content(background / "checkpoints" / name, tmp_path / f"async{step}.pt")
        want = content(sync / "checkpoints" / name, tmp_path / f"sync{step}.pt")
        assert any("expert_bias" in d for d in _keys(want)), sorted(_keys(want))[:20]
        assert differences(got, want) == [], step


def _keys(tree, prefix="") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _keys(v, f"{prefix}.{key}")]
    return [prefix]


@pytest.mark.slow
@pytest.mark.parametrize("direct_io", ["1", "0"])
def test_stall_benchmark_runs(tmp_path, direct_io):
    """``benchmarks/checkpoint_stall.py`` end to end on a tiny model (its figures are noise),
    as documented: data files written with O_DIRECT, and (``MEGATRON_TST_DIRECT_IO=0``) not."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "checkpoint_stall.py"
    res = subprocess.run([sys.executable, str(script), "--hidden", "128", "--layers", "1",
                          "--steps", "8", "--save-every", "2", "--repeats", "1",
                          "--json", str(tmp_path / "stall.json")],
                         capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "MEGATRON_TST_DIRECT_IO": direct_io})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "background / synchronous time lost per save" in res.stdout
    figures = json.loads((tmp_path / "stall.json").read_text())
    assert {r["mode"] for rs in figures["runs"].values() for r in rs} == {"none", "sync", "async"}
    assert all(r["checkpoint_bytes"] > 0 for r in figures["runs"]["async"])
