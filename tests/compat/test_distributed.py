"""Two gloo ranks run real megatron-core training under the layer (megatron imported first)."""

from __future__ import annotations

import pytest

from ._plan import TWO_RANK_PROBES as PROBES
from .conftest import run_workload


def test_two_rank_training(runs):
    run = runs["two_ranks"].result()
    assert run.returncode == 0, run.describe()
    for probe in PROBES:
        for rank in (0, 1):
            assert not run.failed(probe, rank), run.describe()
    value = lambda probe, rank=0: run.results[(rank, probe)]["value"]  # noqa: E731
    # The same data on both DP ranks, and TP=2 (with or without SP) matches DP=2 exactly-ish.
    assert value("train_step", 0) == value("train_step", 1)
    for probe in ("tp2_train_step", "tp2_sp_train_step"):
        for got, want in zip(sum(value(probe), []), sum(value("train_step"), [])):
            assert abs(got - want) < 1e-5
    assert value("pp2_train_step", 0) == [[], []] and len(value("pp2_train_step", 1)) == 2
    assert value("moe_train_step") == value("moe_allgather_train_step")


@pytest.mark.slow
def test_two_rank_dist_checkpoint():
    """dist_checkpointing save/load of model + distributed optimizer sharded over DP=2."""
    run = run_workload(["dist_checkpoint"], nproc=2)
    assert run.returncode == 0, run.describe()
