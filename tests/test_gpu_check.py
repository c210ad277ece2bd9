"""The GPU acceptance check (benchmarks/gpu_check.py, scripts/gpu_check.sh) on a machine without a
GPU: docs/benchmarks.md's commands run exactly as written, every check is listed, the GPU-only
ones are SKIPped with the reason and the CPU-runnable ones PASS with their figures; a check that
misses its target (a tolerance set below the measured error) makes the command exit 1; and every
training the GPU branch would start is a valid recipe."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

SECTION = "## GPU acceptance check"
CHECKS = ["recipe-te", "recipe-local", "te-vs-local", "mce-chunked", "mce-triton",
          "mce-triton-time", "phase1-throughput", "mfu", "fp8"]
GPU_ONLY = {"recipe-te", "te-vs-local", "mce-triton-time", "fp8"}
HAVE_TRITON = importlib.util.find_spec("triton") is not None  # the dev extra installs it
CPU_PASS = {"recipe-local", "mce-chunked", "phase1-throughput"} | ({"mce-triton"} if HAVE_TRITON
                                                                   else set())
NO_GPU = "GPU only: no CUDA device here"

cpu_outcome = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="asserts the outcome on a machine without a CUDA device")


def documented_command(quick: bool) -> str:
    """The section's ``bash scripts/gpu_check.sh`` command with (or without) --quick, comments
    and line continuations removed."""
    text = (REPO / "docs" / "benchmarks.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+", " ", line.split("  #")[0]).strip()
            if line.startswith("bash scripts/gpu_check.sh") and ("--quick" in line) == quick:
                commands.append(line)
    assert len(commands) == 1, f"one such command in docs/benchmarks.md's {SECTION!r}: {commands}"
    return commands[0]


def run_as_documented(command: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    """``command`` in ``cwd`` (holding a link to the repository's scripts/), with this Python."""
    (cwd / "scripts").symlink_to(REPO / "scripts")
    env = {**os.environ, "MEGATRON_TST_PYTHON": sys.executable, "WANDB_MODE": "disabled"}
    env.pop("MEGATRON_TST_PEAK_TFLOPS", None)  # the CPU outcome: no peak, MFU n/a
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def table_rows(stdout: str) -> dict[str, str]:
    """check key -> its table row."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"\(([a-d])\) (\S+)\s", line)
        if m:
            rows[m.group(2)] = line
    return rows


def assert_cpu_outcome(result: subprocess.CompletedProcess, steps: tuple[int, int]) -> None:
    """The CPU table. The throughput check is a timing: on a loaded machine (CI) it may miss
    its target, so it may FAIL (and the command exit 1) with its figure; nothing else may."""
    out = f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    rows = table_rows(result.stdout)
    assert list(rows) == CHECKS, out
    timing_missed = "FAIL" in rows["phase1-throughput"]
    assert result.returncode == (1 if timing_missed else 0), out
    for key in GPU_ONLY:
        assert rows[key].rstrip().endswith(f"SKIP: {NO_GPU}"), rows[key]
    for key in CPU_PASS - {"phase1-throughput"} if timing_missed else CPU_PASS:
        assert rows[key].rstrip().endswith("PASS"), rows[key]
    assert re.search(rf"\(a\) recipe-local\s+{steps[0]}\+{steps[1]} steps; loss \d+\.\d+->",
                     rows["recipe-local"]), rows["recipe-local"]
    assert re.search(r"fp32 \d\.\de-\d+, bf16 \d\.\de-\d+ \(N=96 V=1000 D=48",
                     rows["mce-chunked"]), rows["mce-chunked"]
    triton = rows["mce-triton"]
    assert ("TRITON_INTERPRET=1" in triton if HAVE_TRITON else
            triton.rstrip().endswith("SKIP: triton is not installed")), triton
    ratio = re.search(r"\d+\.\d+ = (\d\.\d+) x s \(s=6;", rows["phase1-throughput"])
    assert ratio and (float(ratio.group(1)) >= 0.9) != timing_missed, rows["phase1-throughput"]
    # MFU needs a device peak: a CPU has none, so n/a with the TFLOP/s the trainer did report
    assert "TFLOP/s/GPU: superposition" in rows["mfu"] and "SKIP: n/a" in rows["mfu"], rows["mfu"]
    if not timing_missed:
        passed = len(CPU_PASS)
        assert f"all checks that ran passed ({passed} passed, 0 failed, {9 - passed} skipped)" \
            in result.stdout


@cpu_outcome
@pytest.mark.slow  # about 1.5 minutes on 2 cores; the default suite runs the mce check below
def test_quick_check_as_documented(tmp_path):
    """`bash scripts/gpu_check.sh --quick --json ...` on CPU: exit 0, every check in the table
    and in the JSON, GPU-only SKIP, the rest PASS with figures."""
    command = documented_command(quick=True)
    result = run_as_documented(command, tmp_path, timeout=900)
    assert_cpu_outcome(result, (16, 8))
    report = json.loads((tmp_path / command.split("--json ", 1)[1].split()[0]).read_text())
    checks = {c["key"]: c for c in report["checks"]}
    timing_missed = checks["phase1-throughput"]["status"] == "FAIL"  # see assert_cpu_outcome
    assert report["passed"] is not timing_missed and report["quick"] is True
    assert list(checks) == CHECKS
    for key, c in checks.items():
        if key != "phase1-throughput" or not timing_missed:
            assert c["status"] == ("PASS" if key in CPU_PASS else "SKIP"), c
        assert c["status"] != "SKIP" or c["reason"], c
    assert checks["mce-chunked"]["data"]["chunked-vs-ref-fp32"] <= 1e-4
    if HAVE_TRITON:
        assert checks["mce-triton"]["data"]["triton-vs-chunked-bf16"] <= 3e-2
    assert checks["phase1-throughput"]["data"]["ratio_over_s"] > 0
    assert report["environment"]["device"].startswith("CPU only")


@cpu_outcome
@pytest.mark.slow  # about 2 minutes on 2 cores (the quick one: 1.5)
def test_full_check_as_documented(tmp_path):
    """The operator's command itself, `bash scripts/gpu_check.sh`, at its full size on CPU."""
    assert_cpu_outcome(run_as_documented(documented_command(quick=False), tmp_path,
                                         timeout=1200), (30, 10))


@cpu_outcome
def test_a_missed_target_fails_the_command(tmp_path):
    """A tolerance below the measured fp32 error (~1e-7 here): those checks FAIL, the command
    exits 1 and says which; the groups left out are SKIP "not selected"."""
    report = tmp_path / "check.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"),
                             "--only", "mce", "--fp32-tol", "1e-12", "--json", str(report)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    checks = {c["key"]: c for c in json.loads(report.read_text())["checks"]}
    assert checks["mce-chunked"]["status"] == "FAIL", checks["mce-chunked"]
    assert checks["mce-chunked"]["data"]["chunked-vs-ref-fp32"] > 1e-12
    assert checks["mce-chunked"]["target"].startswith("vs float64 ref: fp32 <= 1e-12")
    assert checks["recipe-local"]["status"] == "SKIP"
    assert checks["recipe-local"]["reason"] == "not selected (--only)"
    assert checks["mce-triton-time"]["reason"] == NO_GPU
    assert re.search(r"^FAILED: mce-chunked", result.stdout, flags=re.M), result.stdout
    fp32 = checks["mce-chunked"]["data"]["chunked-vs-ref-fp32"]
    assert table_rows(result.stdout)["mce-chunked"].rstrip().endswith(
        f"FAIL: fp32 {fp32:.1e} > 1e-12"), result.stdout


def test_gpu_trainings_are_valid_recipes():
    """The GPU branch cannot run here; every training it would start (TE and local bf16, the
    baseline, FP8 tensorwise and mxfp8) loads as a valid recipe of the shrunk 270m model."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    from megatron_tst.config import load_config
    from megatron_tst.plan import RunPlan

    a = gpu_check.parse_args([])
    common = gpu_check.recipe_overrides(a, True, "/data/demo", "/data/demo.tokenizer.model")
    runs = gpu_check.Runs(a, Path("/unused"), common, "transformer_engine", env={})
    assert set(runs.overrides) == {"transformer_engine", "local", "baseline", "fp8-tensorwise",
                                   "fp8-mxfp8"}
    for name, extra in runs.overrides.items():
        cfg = load_config(str(REPO / "configs" / "270m.yaml"),
                          [*common, *extra, "run_dir=/unused"])
        plan = RunPlan.build(cfg, 1)
        m = cfg.model
        assert (m.num_layers, m.hidden_size, m.seq_length, m.vocab_size, m.params_dtype) == \
            (12, 576, 2048, 128256, "bfloat16"), name
        assert cfg.data.train_paths == ["/data/demo"] and cfg.training.global_batch_size == 8
        if name == "baseline":
            assert (cfg.tst.bag_size, plan.schedule.superposition_steps) == (1, 0)
            assert cfg.training.train_steps == 30
        else:
            assert (cfg.tst.bag_size, plan.schedule.superposition_steps) == (6, 30)
            assert cfg.training.train_steps == 40
        assert m.transformer_impl == ("local" if name == "local" else "transformer_engine")
        assert (m.fp8, m.fp8_recipe if m.fp8 else None) == (
            ("hybrid", name.split("-", 1)[1]) if name.startswith("fp8") else (None, None))


def test_wrapper_without_megatron_tst(tmp_path):
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--quick"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "MEGATRON_TST_PYTHON": "/bin/false"})
    assert result.returncode == 2
    assert "gpu_check.sh: /bin/false cannot import megatron_tst" in result.stderr


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed")
def test_wrapper_shellcheck_clean():
    result = subprocess.run(["shellcheck", str(REPO / "scripts" / "gpu_check.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
