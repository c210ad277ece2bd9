"""Model FLOPs per optimizer step, from the config (the same in both TST phases).

The PaLM convention: ``6 * N`` per position for the weight matmuls (forward + backward) with
``N`` the non-embedding parameters plus the LM head, and ``12 * layers * L * d_attn`` for the
attention score and value matmuls. A superposition step runs ``L`` positions like any other step;
the bag mean (``s`` additions per position) is negligible and not counted.
"""

from __future__ import annotations

from megatron_tst.config import RunConfig


def matmul_params_per_position(cfg: RunConfig, vocab_size: int) -> int:
    m = cfg.model
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    q = m.num_attention_heads * head_dim
    kv = (m.num_query_groups or m.num_attention_heads) * head_dim
    attn = m.hidden_size * (q + 2 * kv) + q * m.hidden_size
    gate = 2 if m.activation == "swiglu" else 1
    if m.num_moe_experts:
        ffn = m.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size
        mlp = m.moe_router_topk * (gate + 1) * m.hidden_size * ffn + m.hidden_size * m.num_moe_experts
    else:
        ffn = m.ffn_hidden_size or 4 * m.hidden_size
        mlp = (gate + 1) * m.hidden_size * ffn
    return m.num_layers * (attn + mlp) + m.hidden_size * vocab_size


def flops_per_step(cfg: RunConfig, vocab_size: int) -> int:
    m, t = cfg.model, cfg.training
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    per_position = (6 * matmul_params_per_position(cfg, vocab_size)
                    + 12 * m.num_layers * m.seq_length * m.num_attention_heads * head_dim)
    return per_position * m.seq_length * t.global_batch_size
