"""Full and selective activation recomputation give the losses and gradients of no recomputation.

The real trainer runs 4 steps (2 in the superposition phase with s=4, the switch, 2 in recovery)
once without recomputation and once per recomputation setting, in one process group per layout
(``_recompute_worker.py``); every step's loss and this rank's reduced gradients must agree within
1e-6 relative (measured: exactly equal, 0.0: the recomputed forward repeats the same operations),
and the recomputed modules must have run their forward twice. The TP=2 and PP=2 checks take
minutes on a 2-core machine: they are slow tests (``pytest -m slow tests/training/test_recompute.py``).
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, _free_port

WORKER = REPO / "tests" / "training" / "_recompute_worker.py"
COMMON = ["tst.bag_size=4", "tst.superposition_steps=2", "tst.ratio=null",
          "training.train_steps=4", "training.micro_batch_size=1", "training.global_batch_size=2",
          "checkpoint.save_final=false", "checkpoint.load=none"]
NONE = "none="
FULL = "full=model.recompute_granularity=full"
FULL_BLOCK = ("full_block=model.recompute_granularity=full;model.recompute_method=block;"
              "model.recompute_num_layers=1")
SELECTIVE = "selective=model.recompute_granularity=selective;model.recompute_modules=[core_attn]"
SELECTIVE_ALL = ("selective_all=model.recompute_granularity=selective;"
                 "model.recompute_modules=[core_attn,mlp]")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, synthetic_data):
    root = tmp_path_factory.mktemp("recompute")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "demo-cpu.yaml"),
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "num_query_groups": 2, "ffn_hidden_size": 128, "seq_length": 32,
                  "make_vocab_size_divisible_by": 64},
        "data": {"source": "indexed", "train_paths": [synthetic_data["train"]],
                 "valid_paths": [synthetic_data["valid"]],
                 "tokenizer": {"type": "sentencepiece", "path": synthetic_data["tokenizer"]}},
        "training": {"eval_interval": 0, "log_interval": 1},
        "schedule": {"warmup_steps": 1, "decay_fraction": 0.25},
        "logging": {"wandb": False, "timers": False},
    }))
    return recipe


def check(tmp_path, recipe, modes, nproc=1, extra=()):
    out = tmp_path / "out"
    out.mkdir()
    args = [str(WORKER), str(out), str(recipe), *modes, "--", *COMMON, *extra]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rank in range(nproc):
        results = json.loads((out / f"rank{rank}.json").read_text())
        assert set(results) == {m.split("=", 1)[0] for m in modes}
        for name, r in results.items():
            assert r["steps"] == 4, (name, r)
            assert all(x is None or x <= 1e-6 for x in r["loss_rel"]), (rank, name, r)
            assert max(r["grad_rel"]) <= 1e-6, (rank, name, r)
        base = results["none"]["calls"]
        assert base["core_attn"] > 0 and base["mlp"] > 0
        for name, r in results.items():  # the recomputed modules ran twice
            twice = recomputed(r["overrides"])
            assert r["calls"] == {k: base[k] * (2 if k in twice else 1) for k in base}, (name, r)
        losses = [x for x in results["none"]["loss"] if x is not None]
        if losses:  # the last pipeline stage: the run trained (losses move, both phases)
            assert len(losses) == 4 and len(set(losses)) == 4
    return results


def recomputed(overrides: list[str]) -> set[str]:
    """The modules (of core_attn, mlp) a run's overrides recompute."""
    o = dict(x.split("=", 1) for x in overrides)
    granularity = o.get("model.recompute_granularity")
    if granularity == "full":
        return {"core_attn", "mlp"}
    if granularity == "selective":
        return set(o.get("model.recompute_modules", "[core_attn]").strip("[]").split(","))
    return set()


def test_recompute_matches_none_single_process(tmp_path, recipe):
    check(tmp_path, recipe, [NONE, FULL, SELECTIVE, SELECTIVE_ALL])


@pytest.mark.slow
def test_recompute_matches_none_tp2(tmp_path, recipe):
    check(tmp_path, recipe, [NONE, FULL, SELECTIVE_ALL], nproc=2,
          extra=["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"])


@pytest.mark.slow
def test_recompute_matches_none_pp2(tmp_path, recipe):
    check(tmp_path, recipe, [NONE, FULL_BLOCK, SELECTIVE], nproc=2,
          extra=["parallel.pipeline_model_parallel_size=2"])
