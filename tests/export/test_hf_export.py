"""megatron-tst checkpoints -> Hugging Face directories -> transformers' own forward on CPU.

The exported model must give the logits of megatron-core's forward of the same checkpoint within
1e-4 (fp32; measured ~1e-6) and generate text; a checkpoint saved under TP=2 exports to exactly
the weights of the TP=1 checkpoint it holds.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_tst import cli
from megatron_tst.export.hf import export_checkpoint, megatron_logits, one_process_model
from tests.conftest import run_cli, write_tiny_recipe
from tests.export.conftest import COMMON, DENSE, sample_batch, train_run

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def hf_model(outdir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(outdir),
                                                             dtype=torch.float32).eval()


def assert_matches_megatron(checkpoint, outdir, tokens, tol=1e-4) -> float:
    """transformers' logits of the export equal megatron-core's of the checkpoint."""
    with one_process_model(checkpoint) as (_, _, model, vocab):
        want = megatron_logits(model, tokens)
    with torch.no_grad():
        got = hf_model(outdir)(input_ids=tokens).logits
    assert got.shape == (*tokens.shape, vocab)
    diff = float((got - want[..., :vocab]).abs().max())
    print(f"\n{outdir.name}: max |logit difference| {diff:.2e}")  # shown with pytest -s
    assert diff < tol
    return diff


def assert_generates(outdir):
    tok = transformers.AutoTokenizer.from_pretrained(str(outdir))
    prompt = tok("the cat sat on", return_tensors="pt")
    out = hf_model(outdir).generate(**prompt, max_new_tokens=12, do_sample=False)
    new = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert new.strip(), new
    return new


def test_dense_export_matches_megatron_and_generates(dense_run, synthetic_data, tmp_path):
    out = tmp_path / "hf"
    result = export_checkpoint(dense_run, out)  # the root: its latest, step 3 (recovery)
    assert result.step == 3 and result.phase == "recovery" and not result.warnings
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 96  # the tokenizer's; 32 padding rows dropped
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is False
    weights = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert weights["lm_head.weight"].shape == (96, 64)
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])

    assert_matches_megatron(dense_run, out, sample_batch(synthetic_data["tokenizer"]))
    assert_generates(out)
    # The tokenizer encodes as the run's sentencepiece model did (no BOS added).
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=synthetic_data["tokenizer"])
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for text in ("the dog ran far away", "  under an old tree\n\nnear the river 42"):
        assert tok(text)["input_ids"] == sp.encode(text)
    assert tok.eos_token_id == sp.eos_id()


def test_moe_export_is_qwen3_moe_and_matches_megatron(moe_run, synthetic_data, tmp_path):
    out = tmp_path / "hf-moe"
    result = export_checkpoint(moe_run, out)
    assert result.architecture == "Qwen3MoeForCausalLM"
    config = json.loads((out / "config.json").read_text())
    assert (config["num_experts"], config["num_experts_per_tok"], config["norm_topk_prob"]) \
        == (4, 2, True)
    names = safetensors_torch.load_file(str(out / "model.safetensors")).keys()
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
    assert "model.layers.0.self_attn.q_norm.weight" in names
    assert_matches_megatron(moe_run, out, sample_batch(synthetic_data["tokenizer"]))
    assert_generates(out)


def test_superposition_checkpoint_exports_with_a_warning(dense_run, tmp_path, capsys):
    """Through the CLI: a phase-1 checkpoint exports, and the user is told what it is."""
    out = tmp_path / "phase1"
    assert cli.main(["export", str(dense_run / "step_0000001"), "--to", "hf", str(out),
                     "--check"]) == 0
    res = capsys.readouterr()
    assert "superposition phase" in res.err and "not a next-token model" in res.err
    assert "LlamaForCausalLM" in res.out and "max |logit difference|" in res.out
    info = json.loads((out / "megatron_tst_export.json").read_text())
    assert info["phase"] == "superposition" and info["step"] == 1 and info["bag_size"] == 2
    assert "(bags of 2 tokens)" in res.err
    assert info["max_abs_logit_diff"] < 1e-4


def test_tp2_checkpoint_exports_the_same_weights(dense_run, synthetic_data, tmp_path):
    """A TP=2 checkpoint holding the TP=1 checkpoint's weights (one more step at a learning
    rate of 1e-30 from fresh Adam moments: no weight changes) exports to exactly the same
    tensors."""
    recipe = write_tiny_recipe(tmp_path, synthetic_data)
    run_cli(["train", str(recipe), *COMMON, *DENSE, f"checkpoint.load={dense_run}",
             "training.train_steps=4", "optimizer.lr=1e-30", "schedule.final_lr=0",
             "checkpoint.allow_changes=[training.train_steps,optimizer.lr,schedule.final_lr]",
             "checkpoint.load_optimizer=false", "parallel.tensor_model_parallel_size=2"], nproc=2)
    tp2 = tmp_path / "run" / "checkpoints" / "step_0000004"
    one = export_checkpoint(dense_run, tmp_path / "tp1-hf")
    two = export_checkpoint(tp2, tmp_path / "tp2-hf")
    info = json.loads((two.outdir / "megatron_tst_export.json").read_text())
    assert info["saved_layout"]["tp"] == 2 and info["step"] == 4
    a = safetensors_torch.load_file(str(one.outdir / "model.safetensors"))
    b = safetensors_torch.load_file(str(two.outdir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert json.loads((one.outdir / "config.json").read_text()) == \
        json.loads((two.outdir / "config.json").read_text())


SLOW_ARCHITECTURES = {
    # name: (overrides, HF class)
    "qwen3": (["model.qk_layernorm=true"], "Qwen3ForCausalLM"),
    "mixtral": (["model.num_moe_experts=4", "model.moe_router_topk=2",
                 "model.moe_ffn_hidden_size=64"], "MixtralForCausalLM"),
    "smollm3-nope": (["model.num_layers=4", "model.no_rope_freq=2"], "SmolLM3ForCausalLM"),
    "tied-kv-channels": (["model.untie_embeddings=false", "model.kv_channels=8"],
                         "LlamaForCausalLM"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_ARCHITECTURES))
def test_other_architectures_match_megatron(name, synthetic_data, tmp_path):
    overrides, hf_class = SLOW_ARCHITECTURES[name]
    ckpt = train_run(tmp_path, synthetic_data, ["training.train_steps=2", *overrides])
    out = tmp_path / "hf"
    assert export_checkpoint(ckpt, out).architecture == hf_class
    assert_matches_megatron(ckpt, out, sample_batch(synthetic_data["tokenizer"]))
    assert_generates(out)


@pytest.mark.slow
def test_bf16_export_of_an_fp32_run(dense_run, synthetic_data, tmp_path):
    out = tmp_path / "bf16"
    export_checkpoint(dense_run, out, dtype="bfloat16")
    weights = safetensors_torch.load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_matches_megatron(dense_run, out, sample_batch(synthetic_data["tokenizer"]), tol=0.1)


def test_keep_vocab_padding(dense_run, tmp_path):
    out = tmp_path / "padded"
    result = export_checkpoint(dense_run, out, keep_vocab_padding=True)
    assert result.vocab_size == result.padded_vocab_size == 128
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128
    shutil.rmtree(out)
