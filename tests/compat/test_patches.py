"""Each patch is needed: without it a real megatron-core operation fails on CPU; with all, it runs."""

from __future__ import annotations

import re

import pytest

from megatron_tst.compat import PATCHES

from ._plan import ALL_PROBES, NEEDED, TWO_RANK_PROBES


def test_registry_describes_every_patch():
    assert set(NEEDED) == set(PATCHES), "every patch needs a fails-without-it check here"
    for name, patch in PATCHES.items():
        assert patch.name == name and callable(patch.apply)
        assert patch.covers.strip() and patch.why.strip() and "\n" not in patch.why


def test_all_patches_run_megatron_on_cpu(runs):
    run = runs["all"].result()
    assert run.returncode == 0, run.describe()
    assert run.results[(0, "applied")]["value"] == [n for n, p in PATCHES.items() if p.needed()]
    for probe in ALL_PROBES:
        assert not run.failed(probe), run.describe()


@pytest.mark.parametrize("name", sorted(NEEDED))
def test_patch_is_needed(runs, name):
    """A patch the installed megatron-core needs: its probes fail without it. A patch this
    megatron-core does not need (``Patch.versions``) is not applied, and its probes run anyway."""
    nproc, probes, error, frame = NEEDED[name]
    with_all = runs["all" if nproc == 1 else "two_ranks"].result()
    if not PATCHES[name].needed():
        assert name not in with_all.results[(0, "applied")]["value"]
        for rank in range(nproc):
            for probe in probes:
                assert not with_all.failed(probe, rank), with_all.describe()
        return
    without = runs[name].result()
    assert without.returncode != 0, f"{name} excluded yet everything ran:\n{without.describe()}"
    assert (0, "applied") in without.results, without.describe()
    assert name not in without.results[(0, "applied")]["value"]
    for rank in range(nproc):
        for probe in probes:
            assert (rank, probe) in without.results, without.describe()  # the process died
            r = without.results[(rank, probe)]
            assert not r["ok"], f"{probe} ran without {name}"
            assert re.search(error, r["error"]), r["traceback"]
            assert any(re.search(frame, f) for f in r["frames"]), r["traceback"]
    for rank in range(nproc):
        for probe in probes:
            assert probe in (ALL_PROBES if nproc == 1 else TWO_RANK_PROBES)
            assert not with_all.failed(probe, rank), with_all.describe()
