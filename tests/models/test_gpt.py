"""The Llama-style GPTModel built from a ModelConfig, on CPU through real megatron-core."""

import pytest
import torch

from megatron_tst.config import load_config
from megatron_tst.models.gpt import build_model, build_transformer_config, count_parameters
from megatron_tst.plan import padded_vocab_size, resolve_transformer_impl


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, ["data.source=demo", "model.num_layers=2", "model.hidden_size=64",
                              "model.num_attention_heads=4", "model.num_query_groups=2",
                              "model.ffn_hidden_size=96", "model.seq_length=16"])


def test_padded_vocab_size():
    assert padded_vocab_size(4096, 128, 1) == 4096
    assert padded_vocab_size(4097, 128, 1) == 4224
    assert padded_vocab_size(128256, 128, 8) == 129024  # the Llama-3 vocabulary at TP=8


def test_llama_style_architecture(cfg, megatron_env):
    assert resolve_transformer_impl(cfg) == "local"  # no transformer-engine on CPU
    tc = build_transformer_config(cfg)
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and not tc.add_bias_linear
    assert tc.num_query_groups == 2
    model = build_model(cfg, vocab_size=128)
    names = dict(model.named_parameters())
    # untied: separate input embedding and LM head
    assert "embedding.word_embeddings.weight" in names and "output_layer.weight" in names
    assert names["embedding.word_embeddings.weight"].data_ptr() != names["output_layer.weight"].data_ptr()
    assert "embedding.position_embeddings.weight" not in names  # RoPE, no learned positions
    h, kv = 64, 2 * (64 // 4)  # GQA: 4 query heads of 16, 2 KV groups
    assert names["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (h + 2 * kv, h)
    assert names["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 96, h)  # SwiGLU
    assert count_parameters(model) == sum(p.numel() for p in names.values())


def test_forward_backward_matches_plain_cross_entropy(cfg, megatron_env):
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=128)
    tokens = torch.randint(0, 128, (2, 16))
    labels = torch.randint(0, 128, (2, 16))
    pos = torch.arange(16).expand(2, 16)
    per_token = model(tokens, pos, attention_mask=None, labels=labels)
    logits = model(tokens, pos, attention_mask=None)  # [B, S, V]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 128).float(), labels.reshape(-1),
                                            reduction="none").view(2, 16)
    torch.testing.assert_close(per_token, ref, rtol=1e-5, atol=1e-5)
    per_token.mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_causal(cfg, megatron_env):
    """Changing a later token never changes earlier logits."""
    model = build_model(cfg, vocab_size=128).eval()
    tokens = torch.randint(0, 128, (1, 16))
    pos = torch.arange(16)[None]
    a = model(tokens, pos, attention_mask=None)
    tokens2 = tokens.clone()
    tokens2[0, 10] = (tokens2[0, 10] + 1) % 128
    b = model(tokens2, pos, attention_mask=None)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_no_rope_layers(cfg, megatron_env):
    """SmolLM3-style NoPE layers: model.no_rope_freq=2 leaves RoPE out of every 2nd layer, and
    that changes the forward pass (layer 2 sees no rotary embedding)."""
    from megatron_tst.config import ConfigError

    cfg.model.no_rope_freq = 2
    assert build_transformer_config(cfg).no_rope_freq == [0, 1]
    tokens = torch.randint(0, 128, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    torch.manual_seed(0)
    nope = build_model(cfg, vocab_size=128)
    cfg.model.no_rope_freq = None
    torch.manual_seed(0)
    rope = build_model(cfg, vocab_size=128)
    rope.load_state_dict(nope.state_dict())
    with torch.no_grad():
        a = nope(tokens, positions, attention_mask=None)
        b = rope(tokens, positions, attention_mask=None)
    assert not torch.allclose(a, b)
    with pytest.raises(ConfigError, match="model.no_rope_freq"):
        load_config(None, ["data.source=demo", "model.num_layers=3", "model.no_rope_freq=2"])
