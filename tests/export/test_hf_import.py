"""``megatron-tst import``: Hugging Face directories (built by transformers in the test) as
megatron-tst checkpoints. megatron-core's forward of the import gives transformers' logits within
1e-4 (fp32) for every architecture export writes, and an export of the import is the original
safetensors bit for bit; bad directories and recipes that do not describe the model are refused
with every reason at once."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from megatron_tst.export.hf import export_checkpoint, megatron_logits, one_process_model
from megatron_tst.export.hf_import import ImportError_, import_hf
from tests.conftest import run_cli
from tests.export.hf_models import ARCHITECTURES, VOCAB, save_hf_model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def transformers_logits(hf_dir, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits


def assert_same_files(original, exported):
    a = safetensors_torch.load_file(str(original / "model.safetensors"))
    b = safetensors_torch.load_file(str(exported / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_import_matches_transformers_and_exports_back_bit_for_bit(arch, tmp_path):
    hf_dir = save_hf_model(tmp_path / "hf", arch)
    result = import_hf(hf_dir, tmp_path / "ckpt")
    assert (result.vocab_size, result.padded_vocab_size) == (VOCAB, 128)
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with one_process_model(tmp_path / "ckpt") as (saved, cfg, model, vocab):
        want = megatron_logits(model, tokens)
        # the padded rows are zero: their logits are 0, never a target
        assert float(want[..., VOCAB:].abs().max()) == 0.0
        assert saved.step == 0 and vocab == VOCAB
    got = transformers_logits(hf_dir, tokens)
    diff = float((got - want[..., :VOCAB]).abs().max())
    print(f"\n{arch}: max |logit difference| megatron vs transformers {diff:.2e}")
    assert diff < 1e-4
    exported = export_checkpoint(tmp_path / "ckpt", tmp_path / "exported")
    assert exported.architecture == transformers.AutoConfig.from_pretrained(
        str(hf_dir)).architectures[0] or arch == "smollm3"
    assert_same_files(hf_dir, tmp_path / "exported")


def test_bf16_model_through_the_command_line(tmp_path):
    """The command as docs/hugging-face.md gives it; bf16 weights stay bf16 and come back bitwise,
    also after the checkpoint directory was moved."""
    hf_dir = save_hf_model(tmp_path / "hf", "qwen3", dtype=torch.bfloat16)
    out = run_cli(["import", str(hf_dir), "--out", str(tmp_path / "ckpt")]).stdout
    assert "Qwen3ForCausalLM" in out and "bfloat16" in out
    info = json.loads((tmp_path / "ckpt" / "import.json").read_text())
    assert info["params_dtype"] == "bfloat16" and info["source"] == str(hf_dir.resolve())
    assert (tmp_path / "ckpt" / "tokenizer" / "tokenizer.json").is_file()
    (tmp_path / "ckpt").rename(tmp_path / "moved")  # its tokenizer copy moves with it
    run_cli(["export", str(tmp_path / "moved"), str(tmp_path / "exported")])
    assert_same_files(hf_dir, tmp_path / "exported")


# ---------------------------------------------------------------------------- refusals
def refused(hf_dir, out, **kw) -> str:
    with pytest.raises(ImportError_) as err:
        import_hf(hf_dir, out, **kw)
    assert not out.exists() or not any(out.iterdir())  # nothing written
    return str(err.value)


def test_bad_directories_are_refused_naming_the_file(tmp_path):
    hf_dir = save_hf_model(tmp_path / "hf", "llama")
    out = tmp_path / "ckpt"
    assert "has no config.json" in refused(tmp_path, out)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    assert "model_type 'gpt2'" in refused(hf_dir, out)
    (hf_dir / "config.json").write_text("{not json")
    assert "config.json is unreadable" in refused(hf_dir, out)
    (hf_dir / "config.json").write_text(json.dumps(
        {**config, "attention_bias": True, "hidden_act": "gelu"}))
    message = refused(hf_dir, out)
    assert "attention_bias=True" in message and "hidden_act='gelu'" in message
    (hf_dir / "config.json").write_text(json.dumps(config))
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    assert "pickles" in refused(hf_dir, out)
    (hf_dir / "pytorch_model.bin").write_bytes(b"")
    (hf_dir / "pytorch_model.bin").rename(hf_dir / "model.safetensors")
    assert "cannot read the weights file" in refused(hf_dir, out)


def test_a_recipe_that_does_not_describe_the_model_gets_every_difference(tmp_path):
    hf_dir = save_hf_model(tmp_path / "hf", "qwen3")
    other_tok = tmp_path / "other"
    other_tok.mkdir()
    from tests.export.hf_models import word_tokenizer

    word_tokenizer(other_tok, vocab=VOCAB - 4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"num_layers": 3, "hidden_size": 32, "num_attention_heads": 4,
                  "num_query_groups": 2, "kv_channels": 16, "ffn_hidden_size": 48,
                  "qk_layernorm": False, "norm_epsilon": 1e-5},
        "data": {"source": "indexed", "train_paths": ["x"],
                 "tokenizer": {"type": "huggingface", "path": str(other_tok / "tokenizer.json")}},
        "logging": {"wandb": False}}))
    result = run_cli(["import", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--recipe",
                      str(recipe)], check=False)
    assert result.returncode == 2, result.stderr
    message = result.stderr
    for expected in ("model.num_layers: the recipe has 3", "model.qk_layernorm",
                     "model.vocab_size", f"has {VOCAB - 4:,} entries", "4 differences"):
        assert expected in message, (expected, message)
    assert not (tmp_path / "ckpt").exists()
