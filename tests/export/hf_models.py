"""Tiny Hugging Face model directories built by transformers inside the tests (never downloaded):
``save_hf_model`` writes config.json, model.safetensors and the tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

VOCAB = 60  # the word-level tokenizer's entries, and the models' vocab_size
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64,
              tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
              pad_token_id=0, bos_token_id=None, eos_token_id=0)
ARCHITECTURES = {
    "llama": ("LlamaConfig", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "moe_intermediate_size": 24,
                                     "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                                     "mlp_only_layers": [], "norm_topk_prob": True}),
    # softmax over all experts, top-k not renormalized (megatron's moe_router_pre_softmax)
    "qwen3_moe-unnormalized": ("Qwen3MoeConfig", {
        "num_experts": 4, "moe_intermediate_size": 24, "num_experts_per_tok": 2,
        "norm_topk_prob": False}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2,
                                  "tie_word_embeddings": True}),
    # RoPE in layers 1 and 3, none in 2 and 4 (megatron's model.no_rope_freq=2)
    "smollm3": ("SmolLM3Config", {"num_hidden_layers": 4, "no_rope_layer_interval": 2,
                                  "no_rope_layers": [1, 0, 1, 0], "tie_word_embeddings": True}),
}


def word_tokenizer(outdir: Path, vocab: int = VOCAB) -> None:
    """A word-level ``tokenizer.json`` of ``vocab`` entries, EOS ``</s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(outdir / "tokenizer.json"))
    (outdir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
         "unk_token": "<unk>"}))


def save_hf_model(outdir: Path, arch: str, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                  overrides: Optional[dict] = None, scale: float = 0.05,
                  tokenizer=word_tokenizer) -> Path:
    """A tiny ``arch`` model with random weights (norm weights too: every weight matters)."""
    import transformers

    name, extra = ARCHITECTURES[arch]
    config = getattr(transformers, name)(**{**COMMON, **extra, **(overrides or {})})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model.to(dtype).save_pretrained(outdir)
    tokenizer(outdir)
    return outdir
