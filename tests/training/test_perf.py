"""Efficiency metrics, memory, megatron timers and the profiler (training/perf.py, profiler.py).

Units: the peak table and its overrides, the TFLOP/s and MFU arithmetic, memory, the console
line, the profiler's step range; megatron's timers min/max over two real gloo ranks; one TST run
through the CLI that checks every new metrics.jsonl field and the trace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.config.schema import ProfileConfig
from megatron_tst.training.metrics import format_metrics
from megatron_tst.training.perf import (PEAK_ENV, PerfMonitor, StepTimers, format_duration,
                                        max_over_ranks, memory_gib, mfu, resolve_peak,
                                        table_peak_tflops, tflops_per_gpu)
from megatron_tst.training.profiler import StepProfiler
from megatron_tst.tst.schedule import RECOVERY, SUPERPOSITION, Phase
from tests.conftest import REPO, _free_port, read_metrics, run_cli

CPU = torch.device("cpu")


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA A100-SXM4-40GB", 312),
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989),
    ("NVIDIA B200", 2250),
    ("NVIDIA GB200", None), ("NVIDIA H800", None), ("Tesla V100-SXM2-32GB", None),
    ("NVIDIA RTX A6000", None), ("", None)])
def test_peak_table_matches_device_names(name, tflops):
    assert table_peak_tflops(name) == tflops


def test_peak_recipe_beats_environment_and_unknown_devices_get_no_mfu():
    assert resolve_peak(500.0, CPU, {PEAK_ENV: "700"}).tflops == 500.0
    env = resolve_peak(None, CPU, {PEAK_ENV: " 700.5 "})
    assert env.tflops == 700.5 and env.source == PEAK_ENV
    unknown = resolve_peak(None, CPU, {})
    assert unknown.tflops is None and "cpu" in unknown.source
    for bad in ("fast", "0", "-3", "nan", "inf"):
        with pytest.raises(ConfigError, match=f"{PEAK_ENV}='{bad}': must be a positive number"):
            resolve_peak(None, CPU, {PEAK_ENV: bad})


def test_tflops_and_mfu_arithmetic():
    # 3.2 PFLOP per step over 8 GPUs in 2 s: 200 TFLOP/s per GPU; on H100 SXM (989): 20.2 %
    assert tflops_per_gpu(3.2e15, 2.0, 8) == pytest.approx(200.0)
    assert mfu(200.0, 989.0) == pytest.approx(0.20222, abs=1e-5)
    assert mfu(200.0, None) is None


def test_cpu_memory_follows_an_allocation():
    before = memory_gib(CPU)
    assert set(before) == {"rss_gib", "rss_peak_gib"}
    block = torch.ones(64 * 2 ** 20)  # 256 MiB, written, so resident
    after = memory_gib(CPU)
    assert after["rss_gib"] - before["rss_gib"] > 0.2
    assert after["rss_peak_gib"] >= after["rss_gib"] > 0.2
    del block
    assert max_over_ranks({"a": 1.5}, CPU) == {"a": 1.5}  # no process group: the value itself


def test_console_line():
    m = {"loss": 5.12341, "lr": 3e-4, "grad_norm": 0.8123, "tokens_per_s": 12345.4,
         "positions_per_s": 3086.2, "step_time_s": 0.4127, "tflops_per_gpu": 41.23,
         "mfu": 0.41693, "mem_allocated_gib": 12.3, "mem_reserved_gib": 14.0,
         "mem_peak_gib": 15.04, "elapsed_s": 62.4, "eta_s": 850.2}
    assert format_metrics(20, 300, m) == (
        "step 20/300 | loss 5.1234 | lr 3.000e-04 | grad 0.812 | data tok/s 12,345 | "
        "pos/s 3,086 | 0.413 s/step | 41.2 TFLOP/s/GPU | MFU 41.7% | mem 12.30 GiB (peak 15.04) | "
        "elapsed 0:01:02 | ETA 0:14:10")
    cpu = {"loss": 4.0, "tokens_per_s": 10.0, "tflops_per_gpu": 0.000412, "mfu": None,
           "rss_gib": 0.5, "rss_peak_gib": 0.75}
    assert format_metrics(1, 2, cpu) == ("step 1/2 | loss 4.0000 | data tok/s 10 | "
                                         "0.000412 TFLOP/s/GPU | rss 0.50 GiB (peak 0.75)")
    assert format_duration(90061) == "25:01:01"


def test_no_peak_is_said_once_and_gives_null_mfu(monkeypatch, caplog):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    cfg = RunConfig()
    cfg.logging.timers = False
    with caplog.at_level("INFO", logger="megatron_tst"):
        perf = PerfMonitor(cfg, CPU, world_size=1, rank=0, flops_per_step=10 ** 12, announce=True)
    assert [r.getMessage() for r in caplog.records if "MFU" in r.getMessage()] == [
        f"MFU not reported (null): the peak of a cpu device is unknown; set logging.peak_tflops "
        f"or {PEAK_ENV}"]
    time.sleep(0.05)
    m = perf.step(1, step_time_s=0.5, last_step=5)
    assert m["mfu"] is None and m["tflops_per_gpu"] == pytest.approx(2.0)  # 1 TFLOP in 0.5 s
    assert m["elapsed_s"] >= 0.05 and m["eta_s"] == pytest.approx(4 * m["elapsed_s"])
    assert perf.step(5, 0.5, last_step=5)["eta_s"] == 0
    assert perf.interval() == {}  # no timers, no memory asked for
    assert StepTimers(False).data(it := iter([1])) is it


def test_profile_ranks_outside_the_world_are_refused():
    from megatron_tst.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rank 4 is not in this run of 2 processes"):
        load_config(str(REPO / "configs" / "demo-cpu.yaml"), [
            "training.profile.start_step=1", "training.profile.end_step=2",
            "training.profile.ranks=[0,4]", "training.micro_batch_size=8"], world_size=2)


def test_profiler_runs_only_the_steps_this_job_runs(tmp_path):
    prof = ProfileConfig(start_step=3, end_step=5, ranks=[0, 4])
    resumed = StepProfiler(prof, rank=0, run_dir=tmp_path)
    traces = []
    for step in (5, 6):  # resumed after step 4: profiles step 5 alone
        resumed.begin(step, Phase(RECOVERY, 1))
        x = torch.randn(64, 64)
        (x @ x).sum()
        traces.append(resumed.end(step))
    trace = tmp_path / "profile" / "rank0-steps5-5.json"
    assert traces == [trace, None]
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "train step 5 (recovery, s=1)" for e in events)
    assert resumed.close() is None

    early = StepProfiler(ProfileConfig(2, 5, [1]), rank=1, run_dir=tmp_path)
    for step in (1, 2, 3):  # the run stops after step 3 (a signal, exit_at_step)
        early.begin(step, Phase(SUPERPOSITION, 4))
        assert early.end(step) is None
    assert early.close() == tmp_path / "profile" / "rank1-steps2-3.json"
    assert early.close() is None
    other = StepProfiler(ProfileConfig(1, 1, [1]), rank=0, run_dir=tmp_path)
    other.begin(1, Phase(RECOVERY, 1))
    assert other.end(1) is None and other.close() is None  # rank 0 is not profiled
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == [
        "rank0-steps5-5.json", "rank1-steps2-3.json"]


def _two_rank_worker(out: str) -> None:
    """Run by torchrun (2 ranks, gloo): rank r spends (r+1) x 0.05 s per step in forward-backward
    and (r+1) x 0.02 s per step waiting for data, over 2 steps; only rank 1 evaluates."""
    import torch.distributed as dist

    from megatron_tst.compat import apply_cpu_compat

    apply_cpu_compat()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    timers = StepTimers(True)
    for _ in range(2):
        with timers.time("forward_backward"):
            time.sleep(0.05 * (rank + 1))
        batches = (time.sleep(0.01 * (rank + 1)) or i for i in range(2))
        assert list(timers.data(batches)) == [0, 1]
    if rank == 1:
        with timers.time("eval"):
            time.sleep(0.1)
    result = {"first": timers.report(steps=2), "second": timers.report(steps=2),
              "memory": max_over_ranks({"m": float(rank + 1)}, CPU)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow  # 25 s on 2 cores (3 processes import megatron-core); the default suite checks
# the timers over 2 ranks in test_trainer.py's DP=2 run
def test_timers_min_and_max_over_two_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", str(_free_port()), __file__, str(tmp_path)],
                   env=env, cwd=REPO, check=True, timeout=120, capture_output=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # every rank gets the same report
    first = ranks[0]["first"]
    assert set(first) == {f"time_{n}_{x}_s" for n in ("forward_backward", "data", "eval")
                          for x in ("min", "max")}  # optimizer and save did not run
    assert 0.05 <= first["time_forward_backward_min_s"] < 0.09  # rank 0, per step
    assert 0.10 <= first["time_forward_backward_max_s"] < 0.5  # rank 1
    assert 0.02 <= first["time_data_min_s"] < 0.035 and 0.04 <= first["time_data_max_s"] < 0.3
    assert first["time_eval_min_s"] == first["time_eval_max_s"] >= 0.1  # rank 1 only, in total
    assert ranks[0]["second"] == {}  # reset: nothing ran since
    assert ranks[0]["memory"] == {"m": 2.0}


def test_cli_tst_run_logs_efficiency_memory_timers_and_a_trace(tiny_recipe, tmp_path):
    run = tmp_path / "perf"
    out = run_cli(["train", str(tiny_recipe), f"run_dir={run}", "tst.bag_size=2",
                   "tst.superposition_steps=2", "training.train_steps=4",
                   "training.eval_interval=3", "checkpoint.save_interval=3",
                   "checkpoint.save_final=false",
                   "logging.log_memory=true", "logging.peak_tflops=1.0",
                   "training.profile.start_step=2", "training.profile.end_step=3"])
    train = read_metrics(run)
    assert [r["phase"] for r in train] == ["superposition"] * 2 + ["recovery"] * 2
    per_step = train[0]["flops"]
    for r in train:
        assert r["tflops_per_gpu"] == pytest.approx(per_step / r["step_time_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 1.0)
        assert r["tokens_per_s"] == pytest.approx(r["bag_size"] * r["positions_per_s"])
        assert r["rss_peak_gib"] >= r["rss_gib"] > 0.05
        for name in ("forward_backward", "optimizer", "data"):
            lo, hi = r[f"time_{name}_min_s"], r[f"time_{name}_max_s"]
            assert 0 < lo == hi  # one rank
        assert r["time_forward_backward_max_s"] <= r["step_time_s"]
    elapsed = [r["elapsed_s"] for r in train]
    assert elapsed == sorted(elapsed) and elapsed[0] >= train[0]["step_time_s"]
    assert [r["eta_s"] > 0 for r in train] == [True, True, True, False]
    # evaluations (after steps 2, the switch, and 3) and the save (after step 3) are reported
    # in the next interval
    assert [("time_eval_max_s" in r, "time_save_max_s" in r) for r in train] == [
        (False, False), (False, False), (True, False), (True, True)]
    assert train[3]["time_save_min_s"] == train[3]["time_save_max_s"] > 0
    trace = run / "profile" / "rank0-steps2-3.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"train step 2 (superposition, s=2)", "train step 3 (recovery, s=1)"} <= names
    assert any(n and n.startswith("aten::") for n in names)  # the ops themselves
    events = [r["message"] for r in read_metrics(run, "event")]
    assert f"profiler trace written to {trace}" in events
    lines = out.stdout.splitlines()
    step4 = next(x for x in lines if "step 4/4 | loss" in x)
    for part in ("data tok/s ", "pos/s ", " TFLOP/s/GPU", "MFU ", "rss ", "elapsed 0:00:",
                 "ETA 0:00:00"):
        assert part in step4
    # The peak's source and the timer lines go to the run's log file, not the terminal.
    logged = (run / "logs" / "rank0.log").read_text().splitlines()
    for where, quiet in ((logged, False), (lines, True)):
        found = [any("MFU against a peak of 1 TFLOP/s per GPU (logging.peak_tflops)" in x
                     for x in where),
                 any("step 4 | seconds, min-max over ranks" in x and "save " in x for x in where)]
        assert found == [not quiet] * 2, (quiet, found)


if __name__ == "__main__":  # the two ranks of test_timers_min_and_max_over_two_ranks
    _two_rank_worker(sys.argv[1])
