"""Every parallel layout equals the single-process run, in both TST phases and across the switch.

All layouts start from one single-process checkpoint taken after step 1 (so they share the
initial weights, whatever the layout's own initialisation would give) and train steps 2-5:
2-3 in the superposition phase (s=4), 4-5 in recovery. Each layout's loss and gradient norm
per step must equal the single-process continuation up to the order of floating-point sums
(measured differences: ~1e-7 relative; the bound is 1e-5 for the loss, 1e-4 for the norm).
"""

import shutil

import pytest
import yaml

from tests.conftest import REPO, read_metrics, run_cli

COMMON = ["tst.bag_size=4", "tst.superposition_steps=3", "tst.ratio=null",
          "training.train_steps=5", "training.micro_batch_size=1", "training.global_batch_size=4",
          "model.make_vocab_size_divisible_by=64"]  # padded vocab 128 at TP=1 and TP=2 alike

LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "tp2-sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "dp2": [],  # 2 ranks x 2 micro-batches of gradient accumulation
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_data):
    root = tmp_path_factory.mktemp("layouts")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(REPO / "configs" / "demo-cpu.yaml"),
        "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                  "num_query_groups": 2, "ffn_hidden_size": 128, "seq_length": 32},
        "data": {"source": "indexed", "train_paths": [synthetic_data["train"]],
                 "valid_paths": [synthetic_data["valid"]],
                 "tokenizer": {"type": "sentencepiece", "path": synthetic_data["tokenizer"]}},
        "training": {"eval_interval": 0, "log_interval": 1},
        "schedule": {"warmup_steps": 1, "decay_fraction": 0.4},
        "logging": {"wandb": False},
    }))
    single = root / "single"
    run_cli(["train", str(recipe), f"run_dir={single}", *COMMON, "training.exit_at_step=1"])
    shutil.copytree(single / "checkpoints", root / "start")
    run_cli(["train", str(recipe), f"run_dir={single}", *COMMON])
    return recipe, root / "start", read_metrics(single)[1:]  # steps 2..5


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(reference, tmp_path, layout):
    recipe, start, expected = reference
    run = tmp_path / layout
    shutil.copytree(start, run / "checkpoints")
    run_cli(["train", str(recipe), f"run_dir={run}", *COMMON, *LAYOUTS[layout]], nproc=2)
    got = read_metrics(run)
    assert [(r["step"], r["phase"]) for r in got] == [(r["step"], r["phase"]) for r in expected]
    assert [r["phase"] for r in got] == ["superposition"] * 2 + ["recovery"] * 2
    for g, e in zip(got, expected):
        assert g["loss"] == pytest.approx(e["loss"], rel=1e-5), (layout, g["step"])
        assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-4), (layout, g["step"])
