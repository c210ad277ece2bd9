"""``export/mapping.py``: the one table between megatron-core's weights and Hugging Face's. Each
rule's two directions undo each other bit for bit, and for every architecture the rules name
exactly the weights transformers itself builds for that config (tiny models built in the test,
nothing downloaded)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_tst.export.mapping import ModelShape, weight_map

DENSE = ModelShape(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                   head_dim=8, qk_layernorm=False, num_moe_experts=0, untie_embeddings=True)
SHAPES = {
    "llama": DENSE,
    "smollm3": DENSE,
    "qwen3": replace(DENSE, qk_layernorm=True, head_dim=16),
    "qwen3_moe": replace(DENSE, qk_layernorm=True, num_moe_experts=4),
    "mixtral": replace(DENSE, num_moe_experts=4, untie_embeddings=False),
}
VOCAB, PADDED, FFN = 50, 64, 48


def megatron_shapes(s: ModelShape) -> dict:
    """The megatron weight shapes of ``s`` (TP=1), independently of the mapping."""
    q, kv = s.num_attention_heads * s.head_dim, s.num_query_groups * s.head_dim
    h = s.hidden_size
    shapes = {"embedding.word_embeddings.weight": (PADDED, h),
              "decoder.final_layernorm.weight": (h,)}
    if s.untie_embeddings:
        shapes["output_layer.weight"] = (PADDED, h)
    for i in range(s.num_layers):
        p = f"decoder.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "pre_mlp_layernorm.weight": (h,),
                       p + "self_attention.linear_qkv.weight": (q + 2 * kv, h),
                       p + "self_attention.linear_proj.weight": (h, q)})
        if s.qk_layernorm:
            shapes[p + "self_attention.q_layernorm.weight"] = (s.head_dim,)
            shapes[p + "self_attention.k_layernorm.weight"] = (s.head_dim,)
        if not s.num_moe_experts:
            shapes[p + "mlp.linear_fc1.weight"] = (2 * FFN, h)
            shapes[p + "mlp.linear_fc2.weight"] = (h, FFN)
            continue
        shapes[p + "mlp.router.weight"] = (s.num_moe_experts, h)
        for j in range(s.num_moe_experts):
            e = f"{p}mlp.experts.local_experts.{j}."
            shapes[e + "linear_fc1.weight"] = (2 * FFN, h)
            shapes[e + "linear_fc2.weight"] = (h, FFN)
    return shapes


def hf_state_shapes(arch: str, s: ModelShape, tmp_path) -> dict:
    """The weights transformers saves for a config of ``s`` (a tiny model, random weights; the
    files a released model ships: transformers 5 fuses MoE experts in memory, not on disk)."""
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    common = dict(vocab_size=VOCAB, pad_token_id=0, hidden_size=s.hidden_size,
                  num_hidden_layers=s.num_layers,
                  num_attention_heads=s.num_attention_heads,
                  num_key_value_heads=s.num_query_groups, head_dim=s.head_dim,
                  intermediate_size=FFN, tie_word_embeddings=not s.untie_embeddings)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "smollm3": lambda: transformers.SmolLM3Config(**common),
        "qwen3": lambda: transformers.Qwen3Config(**common),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
            **common, num_experts=s.num_moe_experts, moe_intermediate_size=FFN,
            num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
        "mixtral": lambda: transformers.MixtralConfig(
            **common, num_local_experts=s.num_moe_experts, num_experts_per_tok=2),
    }[arch]()
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / arch)
    with safe_open(str(tmp_path / arch / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if not s.untie_embeddings:
        shapes.pop("lm_head.weight", None)  # tied: the embedding's own tensor
    return shapes


@pytest.mark.parametrize("arch", SHAPES)
def test_rules_name_every_weight_of_both_sides(arch, tmp_path):
    s = SHAPES[arch]
    rules = weight_map(s, arch, VOCAB, PADDED)
    assert sorted(r.megatron for r in rules) == sorted(megatron_shapes(s))
    gen = torch.Generator().manual_seed(0)
    megatron = {k: torch.randn(shape, generator=gen) for k, shape in megatron_shapes(s).items()}
    hf = {}
    for rule in rules:
        hf.update(zip(rule.hf, rule.to_hf(megatron[rule.megatron])))
    assert {k: tuple(v.shape) for k, v in hf.items()} == hf_state_shapes(arch, s, tmp_path)


@pytest.mark.parametrize("arch", SHAPES)
def test_both_directions_undo_each_other_bit_for_bit(arch):
    s = SHAPES[arch]
    gen = torch.Generator().manual_seed(1)
    for rule in weight_map(s, arch, VOCAB, PADDED):
        shape = megatron_shapes(s)[rule.megatron]
        original = torch.randn(shape, generator=gen)
        if shape[0] == PADDED:  # megatron's padding rows: zero, as import makes them
            original[VOCAB:] = 0
        parts = rule.to_hf(original)
        assert torch.equal(rule.to_megatron(*parts), original), rule.megatron
        again = rule.to_hf(rule.to_megatron(*parts))
        assert all(torch.equal(a, b) for a, b in zip(again, parts)), rule.hf


def test_qkv_rows_follow_megatrons_per_group_layout():
    """Independent of the mapping's code: megatron's fused rows are, per KV group, that group's
    query heads, then its key head, then its value head (head_dim rows each)."""
    s = DENSE  # 4 query heads in 2 groups, head_dim 8
    rule = next(r for r in weight_map(s, "llama", VOCAB) if "linear_qkv" in r.megatron)
    rows = torch.arange(8 * 8, dtype=torch.float32).repeat_interleave(32).view(-1, 32)
    q, k, v = rule.to_hf(rows)
    block = lambda n: rows[n * 8:(n + 1) * 8]  # noqa: E731  the n-th head_dim block
    assert torch.equal(q, torch.cat([block(0), block(1), block(4), block(5)]))
    assert torch.equal(k, torch.cat([block(2), block(6)]))
    assert torch.equal(v, torch.cat([block(3), block(7)]))
