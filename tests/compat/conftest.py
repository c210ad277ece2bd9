"""Runs the compat workloads (tests/compat/_workloads.py) in fresh processes, concurrently.

The layer patches process-global state, so it is never applied inside the pytest process: every
check runs megatron-core in a subprocess with ``apply_cpu_compat(exclude=...)``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pytest

WORKLOADS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_workloads.py")
TIMEOUT_S = 600


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s on 2 cores")


@dataclass
class Run:
    returncode: int
    results: dict  # (rank, probe) -> {"ok": bool, "value" | "error" + "traceback": ...}
    output: str

    def failed(self, probe, rank=0):
        return not self.results[(rank, probe)]["ok"]

    def describe(self) -> str:
        return f"exit {self.returncode}\n{self.output[-6000:]}"


def run_workload(probes, exclude=(), nproc=1, import_first=False) -> Run:
    cmd = [sys.executable, WORKLOADS, "--nproc", str(nproc), "--exclude", ",".join(exclude)]
    cmd += (["--import-first"] if import_first else []) + list(probes)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    results = {}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[(r["rank"], r["probe"])] = r
    return Run(p.returncode, results, p.stdout + p.stderr)


class WorkloadPool:
    """Starts every requested run at once (they are mostly megatron import time) and hands out
    futures, so the whole set costs about as much wall time as its slowest few runs."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
        self._runs: dict[tuple, Future] = {}

    def submit(self, probes, exclude=(), nproc=1, import_first=False) -> Future:
        key = (tuple(probes), tuple(sorted(exclude)), nproc, import_first)
        if key not in self._runs:
            self._runs[key] = self._pool.submit(run_workload, *key)
        return self._runs[key]

    def shutdown(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session")
def runs():
    """Every run the compat tests need, all started together on first use."""
    from megatron_tst.compat import PATCHES

    from ._plan import ALL_PROBES, NEEDED, TWO_RANK_PROBES

    pool = WorkloadPool()
    futures = {"all": pool.submit(ALL_PROBES)}
    futures["two_ranks"] = pool.submit(TWO_RANK_PROBES, nproc=2, import_first=True)
    for name, (nproc, probes, _, _) in NEEDED.items():
        if PATCHES[name].needed():  # the installed megatron-core needs it: prove it
            futures[name] = pool.submit(probes, exclude=[name], nproc=nproc)
    yield futures
    pool.shutdown()
