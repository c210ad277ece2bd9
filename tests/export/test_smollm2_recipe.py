"""``configs/smollm2-135m-tst.yaml``, its comment's commands and docs/hugging-face.md's import
commands exactly as written, on a stand-in of SmolLM2-135M: the released model's config.json values (its shape: 30 layers of 576, 9 heads in 3
KV groups, tied embeddings, RoPE base 100000, a 49,152-entry vocabulary) with random bf16 weights
and a word-level tokenizer of 49,152 entries, built by transformers in the test. The recipe's
import command accepts it (the recipe describes the model), then the recipe trains from it
through both TST phases, shrunk to CPU size only in sequence length and batch."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics, run_cli
from tests.data.conftest import make_texts
from tests.data.test_gpu_data_prep import _commands_in, write_corpora
from tests.models.test_sizing import SINGLE_RANK

RECIPE = REPO / "configs" / "smollm2-135m-tst.yaml"
CPU = [*SINGLE_RANK, "model.seq_length=64", "training.train_steps=4",
       "training.micro_batch_size=1", "training.global_batch_size=1", "training.eval_interval=0",
       "training.log_interval=1", "schedule.warmup_steps=1", "logging.wandb=false",
       "checkpoint.save_final=false", "data.num_workers=0", "tst.ratio=null",
       "tst.superposition_steps=2"]


def smollm2_standin(out: Path) -> None:
    transformers = pytest.importorskip("transformers")
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=0,
        eos_token_id=0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(out)
    words = sorted({w for t in make_texts(2000, seed=3) for w in t.split()})[:40000]
    vocab = ["<|endoftext|>", "<unk>", *words]
    vocab += [f"<filler_{i}>" for i in range(49152 - len(vocab))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))


@pytest.mark.slow  # a 135M-parameter model imported twice and trained 4 steps on the CPU
def test_recipe_commands_then_training_from_the_model(tmp_path):
    write_corpora(tmp_path)
    smollm2_standin(tmp_path / "models" / "SmolLM2-135M")
    (tmp_path / "configs").symlink_to(REPO / "configs")  # launched from a checkout's root
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    text = RECIPE.read_text()
    commands = [*_commands_in(text, "megatron-tst preprocess"),
                *_commands_in(text, "megatron-tst import")]
    assert len(commands) == 2, commands
    doc = (REPO / "docs" / "hugging-face.md").read_text().split("## Import", 1)[1]
    documented = sorted(_commands_in(doc.split("\n## ", 1)[0], "megatron-tst import"))
    assert commands[1] in documented and len(documented) == 2, documented
    readme = _commands_in((REPO / "README.md").read_text(), "megatron-tst import")
    assert readme and readme <= set(documented), readme
    commands += [c for c in documented if c != commands[1]]
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=1800)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    for command in commands[1:]:
        out = tmp_path / shlex.split(command)[shlex.split(command).index("--out") + 1]
        assert (out / "latest").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()

    run_cli(["train", str(RECIPE), *CPU], cwd=tmp_path, timeout=1800)
    run_dir = tmp_path / "runs" / "smollm2-135m-tst"
    train = read_metrics(run_dir)
    assert [r["phase"] for r in train] == ["superposition"] * 2 + ["recovery"] * 2
    events = [r["message"] for r in read_metrics(run_dir, "event")]
    assert any("initialized the model weights from models/SmolLM2-135M" in e for e in events)
