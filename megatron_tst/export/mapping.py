"""The one mapping between megatron-core's GPT weights and Hugging Face's, used both ways.

``weight_map(shape, arch)`` lists a :class:`Rule` per megatron weight of a TP=PP=EP=1 model: its
Hugging Face key(s) and the layout change between them. Export applies each rule's ``to_hf``,
import its ``to_megatron``; ``to_megatron(*to_hf(t)) == t`` bit for bit, so an export of an
import is the original file's tensors (``tests/export/test_mapping.py``).

============================  ==================================================================
megatron-core                 Hugging Face
============================  ==================================================================
``linear_qkv`` (fused)        ``q_proj``, ``k_proj``, ``v_proj``: megatron stores the rows per
                              KV group, ``[q heads of the group, k, v]`` blocks of head_dim rows
``linear_fc1`` (SwiGLU)       ``gate_proj`` (first half of the rows), ``up_proj`` (second half)
``linear_proj``, ``fc2``      ``o_proj``, ``down_proj``
``input_layernorm``           ``input_layernorm``
``pre_mlp_layernorm``         ``post_attention_layernorm``
``q/k_layernorm``             ``q_norm``, ``k_norm`` (Qwen3)
``router``, ``local_experts`` ``mlp.gate``, ``mlp.experts.N.{gate,up,down}_proj`` (Qwen3-MoE),
                              ``block_sparse_moe.gate``, ``...experts.N.{w1,w3,w2}`` (Mixtral)
``word_embeddings``           ``embed_tokens``; ``output_layer`` -> ``lm_head`` (untied): the
                              rows past the vocabulary (megatron's padding) are dropped on
                              export and zero-filled on import
============================  ==================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["ModelShape", "Rule", "weight_map"]


@dataclass(frozen=True)
class ModelShape:
    """What the mapping needs of a model (``ModelShape.of(cfg.model)``)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    qk_layernorm: bool
    num_moe_experts: int  # 0: dense
    untie_embeddings: bool

    @classmethod
    def of(cls, m) -> "ModelShape":
        heads = m.num_attention_heads
        return cls(m.num_layers, m.hidden_size, heads, m.num_query_groups or heads,
                   m.kv_channels or m.hidden_size // heads, bool(m.qk_layernorm),
                   m.num_moe_experts or 0, bool(m.untie_embeddings))


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    to_megatron: Callable[..., torch.Tensor]


def _same(megatron: str, hf: str) -> Rule:
    return Rule(megatron, (hf,), lambda t: (t,), lambda t: t)


def _gate_up(megatron: str, gate: str, up: str) -> Rule:
    return Rule(megatron, (gate, up), lambda t: tuple(t.chunk(2, dim=0)),
                lambda g, u: torch.cat([g, u], dim=0))


def _qkv(src: str, dst: str, s: ModelShape) -> Rule:
    groups, per_group, d, hidden = s.num_query_groups, \
        s.num_attention_heads // s.num_query_groups, s.head_dim, s.hidden_size

    def to_hf(t):
        qkv = t.view(groups, per_group + 2, d, hidden)
        return (qkv[:, :per_group].reshape(groups * per_group * d, hidden),
                qkv[:, per_group].reshape(groups * d, hidden),
                qkv[:, per_group + 1].reshape(groups * d, hidden))

    def to_megatron(q, k, v):
        return torch.cat([q.reshape(groups, per_group, d, hidden),
                          k.reshape(groups, 1, d, hidden),
                          v.reshape(groups, 1, d, hidden)], dim=1).reshape(-1, hidden)

    attn = dst + "self_attn."
    return Rule(src + "self_attention.linear_qkv.weight",
                (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                to_hf, to_megatron)


def _vocab_rows(megatron: str, hf: str, vocab: int, padded: Optional[int]) -> Rule:
    """Export keeps the first ``vocab`` rows; import pads to ``padded`` with zero rows (never
    a target, as megatron's own padding)."""
    def to_megatron(t):
        if padded is None or padded == t.shape[0]:
            return t
        return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])

    return Rule(megatron, (hf,), lambda t: (t[:vocab],), to_megatron)


def weight_map(s: ModelShape, arch: str, vocab: int, padded: Optional[int] = None) -> list[Rule]:
    """Every weight of the model as a rule, in megatron's order. ``arch``: the
    ``export.hf.ARCHITECTURES`` key; ``vocab``: the Hugging Face vocabulary rows; ``padded``:
    megatron's (import), or None where the mapping only drops rows (export)."""
    rules = [_vocab_rows("embedding.word_embeddings.weight", "model.embed_tokens.weight",
                         vocab, padded)]
    for i in range(s.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        rules += [_same(src + "input_layernorm.weight", dst + "input_layernorm.weight"),
                  _qkv(src, dst, s),
                  _same(src + "self_attention.linear_proj.weight", dst + "self_attn.o_proj.weight")]
        if s.qk_layernorm:
            rules += [_same(src + "self_attention.q_layernorm.weight", dst + "self_attn.q_norm.weight"),
                      _same(src + "self_attention.k_layernorm.weight", dst + "self_attn.k_norm.weight")]
        rules.append(_same(src + "pre_mlp_layernorm.weight", dst + "post_attention_layernorm.weight"))
        if not s.num_moe_experts:
            rules += [_gate_up(src + "mlp.linear_fc1.weight", dst + "mlp.gate_proj.weight",
                               dst + "mlp.up_proj.weight"),
                      _same(src + "mlp.linear_fc2.weight", dst + "mlp.down_proj.weight")]
            continue
        moe = dst + ("mlp." if arch == "qwen3_moe" else "block_sparse_moe.")
        gate, up, down = ("gate_proj", "up_proj", "down_proj") if arch == "qwen3_moe" \
            else ("w1", "w3", "w2")
        rules.append(_same(src + "mlp.router.weight", moe + "gate.weight"))
        for j in range(s.num_moe_experts):
            expert, hf = f"{src}mlp.experts.local_experts.{j}.", f"{moe}experts.{j}."
            rules += [_gate_up(expert + "linear_fc1.weight", f"{hf}{gate}.weight",
                               f"{hf}{up}.weight"),
                      _same(expert + "linear_fc2.weight", f"{hf}{down}.weight")]
    rules.append(_same("decoder.final_layernorm.weight", "model.norm.weight"))
    if s.untie_embeddings:
        rules.append(_vocab_rows("output_layer.weight", "lm_head.weight", vocab, padded))
    return rules
