"""Real checkpoints of tiny models for the export and evaluation tests (trained through the CLI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli, write_tiny_recipe

# 128 padded rows at TP=1 and TP=2 alike (96 real: the synthetic tokenizer), so that a TP=1
# checkpoint resumes under TP=2 and the export drops 32 padding rows.
COMMON = ["model.make_vocab_size_divisible_by=64", "training.eval_interval=0",
          "checkpoint.save_interval=1", "checkpoint.keep_last=0",
          "schedule.warmup_steps=1", "schedule.decay_fraction=0.3"]
# A TST run: step 1 in the superposition phase (s=2), steps 2-3 in recovery.
DENSE = ["training.train_steps=3", "tst.bag_size=2", "tst.ratio=null",
         "tst.superposition_steps=1"]
MOE = ["training.train_steps=2", "model.num_moe_experts=4", "model.moe_router_topk=2",
       "model.moe_ffn_hidden_size=64", "model.moe_aux_loss_coeff=0.01",
       "model.qk_layernorm=true"]


def train_run(root: Path, synthetic_data: dict, overrides: list[str], nproc: int = 1) -> Path:
    """Train the tiny recipe with ``overrides`` into ``root/run``; return its checkpoint root."""
    recipe = write_tiny_recipe(root, synthetic_data)
    run_cli(["train", str(recipe), *COMMON, *overrides], nproc=nproc)
    return root / "run" / "checkpoints"


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory, synthetic_data) -> Path:
    return train_run(tmp_path_factory.mktemp("dense"), synthetic_data, DENSE)


@pytest.fixture(scope="session")
def moe_run(tmp_path_factory, synthetic_data) -> Path:
    return train_run(tmp_path_factory.mktemp("moe"), synthetic_data, MOE)


def sample_batch(tokenizer_path: str, length: int = 32) -> torch.Tensor:
    """Two rows of real text as token ids (the synthetic corpus' words)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    text = ("the dog ran far away and then it slept under an old tree near the river bank "
            "until morning came while the cat sat on a mat ") * 4
    ids = sp.encode(text)
    return torch.tensor([ids[:length], ids[7:7 + length]])
