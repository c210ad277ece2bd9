"""Sizes of a recipe without building it: parameter counts, FLOPs per step, memory per GPU.

Counts follow megatron-core's ``GPTModel`` with this project's specs exactly (no linear biases,
RMSNorm weights, untied or tied LM head, qk-norm over the head dimension, MoE router weights);
``tests/models/test_sizing.py`` checks them against models built on the meta device. Memory is
an estimate for the most loaded GPU of the layout, stated term by term so it can be checked:

- weights in ``model.params_dtype``; gradients in fp32 (megatron DDP with ``grad_reduce_in_fp32``);
- optimizer: Adam moments in fp32 plus fp32 main weights for half-precision params, sharded over
  the data-parallel ranks with the distributed optimizer (expert weights over the expert
  data-parallel ranks);
- activations: Korthikanti et al. 2022 (arXiv 2205.05198) without recomputation, with flash
  attention (no ``L^2`` score term): ``34 L b h`` bytes per layer and micro-batch for a ``4h``
  GeLU MLP; here the MLP term follows the real width (SwiGLU, FFN size, top-k experts for MoE);
  divided by TP with sequence parallelism; 1F1B keeps up to PP micro-batches in flight on the
  first stage. Recomputation (``model.recompute_*``): full keeps each recompute unit's input and
  one unit's activations at a time; selective drops the recomputed modules' insides (MLP/MoE:
  the expanded width; layernorm: the norms' outputs; core attention: nothing, as flash attention
  stores no scores anyway);
- logits: ``L b V / TP`` elements as bf16 logits plus fp32 copies for the loss and its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_tst.config import RunConfig

GiB = 1024 ** 3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ParameterCounts:
    embedding: int  # input word embeddings
    output: int  # LM head (0 when tied to the embedding)
    attention: int  # all layers: QKV and output projections
    qk_norm: int  # all layers: query and key norms
    dense_mlp: int  # all layers, dense models
    experts: int  # all layers, all experts (MoE)
    router: int
    shared_experts: int  # all layers: the MoE layers' shared expert MLPs (every token uses them)
    norms: int  # input/pre-MLP norms of every layer and the final norm
    active_experts: int  # experts a token passes through (top-k per layer)

    @property
    def total(self) -> int:
        return (self.embedding + self.output + self.attention + self.qk_norm + self.dense_mlp
                + self.experts + self.router + self.shared_experts + self.norms)

    @property
    def active(self) -> int:
        """Parameters one token uses: everything but the experts it is not routed to."""
        return self.total - self.experts + self.active_experts

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.output

    def matmul_per_position(self, vocab_size: int, hidden_size: int) -> int:
        """Weights one position multiplies by: the layers' projections, the router, the top-k
        experts and the LM head (counted even when tied to the embedding)."""
        return (self.attention + self.dense_mlp + self.active_experts + self.router
                + self.shared_experts + vocab_size * hidden_size)


def head_dim(cfg: RunConfig) -> int:
    m = cfg.model
    return m.kv_channels or m.hidden_size // m.num_attention_heads


def parameter_counts(cfg: RunConfig, vocab_size: int) -> ParameterCounts:
    """``vocab_size``: the padded vocabulary (``padded_vocab_size``)."""
    m = cfg.model
    h, d = m.hidden_size, head_dim(cfg)
    q, kv = m.num_attention_heads * d, (m.num_query_groups or m.num_attention_heads) * d
    norm = h * (2 if m.normalization == "LayerNorm" else 1)  # LayerNorm has a bias
    qk_norm = 2 * d * (2 if m.normalization == "LayerNorm" else 1) if m.qk_layernorm else 0
    attention = m.num_layers * (h * (q + 2 * kv) + q * h)
    up = 2 if m.activation == "swiglu" else 1
    dense_mlp = experts = router = active_experts = shared = 0
    if m.num_moe_experts:
        f = m.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * h
        per_expert = (up + 1) * h * f
        experts = m.num_layers * m.num_moe_experts * per_expert
        active_experts = m.num_layers * m.moe_router_topk * per_expert
        router = m.num_layers * m.num_moe_experts * h
        shared = m.num_layers * (up + 1) * h * (m.moe_shared_expert_intermediate_size or 0)
    else:
        dense_mlp = m.num_layers * (up + 1) * h * (m.ffn_hidden_size or 4 * h)
    return ParameterCounts(
        embedding=vocab_size * h, output=vocab_size * h if m.untie_embeddings else 0,
        attention=attention, qk_norm=m.num_layers * qk_norm, dense_mlp=dense_mlp, experts=experts, router=router,
        shared_experts=shared, norms=(2 * m.num_layers + 1) * norm, active_experts=active_experts)


def flops_per_step(cfg: RunConfig, vocab_size: int) -> int:
    """Model FLOPs of one optimizer step, the same in both TST phases (PaLM convention).

    ``6 N`` per position for the weight matmuls (forward + backward; ``N`` from
    ``matmul_per_position``) plus ``12 * layers * L * d_attn`` for the attention scores and
    values. A superposition step runs ``L`` positions like any other step; the bag mean (``s``
    additions per position) is negligible and not counted.
    """
    m, t = cfg.model, cfg.training
    n = parameter_counts(cfg, vocab_size).matmul_per_position(vocab_size, m.hidden_size)
    attention = 12 * m.num_layers * m.seq_length * m.num_attention_heads * head_dim(cfg)
    return (6 * n + attention) * m.seq_length * t.global_batch_size


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the most loaded GPU of the layout (see the module docstring)."""

    params_on_gpu: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def memory_estimate(cfg: RunConfig, vocab_size: int, world_size: int) -> MemoryEstimate:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    counts = parameter_counts(cfg, vocab_size)
    tp, pp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.expert_model_parallel_size)
    dp = cfg.data_parallel_size(world_size)
    expert_dp = max(1, world_size // (ep * pp))  # expert tensor parallel size 1
    # First and last stage: layers/pp plus the embedding (first) or head and final norm (last);
    # take the larger. Everything but the norms is split over TP, experts over EP instead.
    layer_share = 1 / pp
    dense_layers = ((counts.attention + counts.dense_mlp + counts.shared_experts) * layer_share
                    / tp)
    norms = (counts.norms - m.hidden_size) * layer_share
    experts = (counts.experts * layer_share) / ep
    router = counts.router * layer_share
    ends = max(counts.embedding, counts.output + m.hidden_size) if pp > 1 else (
        counts.embedding + counts.output + m.hidden_size)
    non_expert = dense_layers + norms + router + ends / tp
    params = non_expert + experts
    weight_bytes = BYTES[m.params_dtype]
    state_bytes = 8 + (4 if weight_bytes < 4 else 0)  # Adam m, v (+ fp32 main weights)
    if p.use_distributed_optimizer:
        optimizer = state_bytes * (non_expert / dp + experts / expert_dp)
    else:
        optimizer = state_bytes * params

    L, b, h = m.seq_length, t.micro_batch_size, m.hidden_size
    up = 2 if m.activation == "swiglu" else 1
    width = (m.moe_router_topk * (m.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * h)
             + (m.moe_shared_expert_intermediate_size or 0)
             if m.num_moe_experts else m.ffn_hidden_size or 4 * h)
    # bytes per L*b*h for 2-byte activations: attention 11, norms 4, MLP 3 + (2 up + 2) f / h
    # (19 for a 4h GeLU MLP); with TP, the 10 of norms and dropouts are split only under SP.
    mlp_inner = (2 * up + 2) * width / h
    coeff = 15 + 3 + mlp_inner
    modules = set(m.recompute_modules or ["core_attn"]) if (
        m.recompute_granularity == "selective") else set()
    # Selective recomputation keeps a module's input, not its inside (core attention: nothing
    # to drop with flash attention, whose L^2 scores are never stored).
    coeff -= mlp_inner if modules & {"mlp", "moe"} else 0
    coeff -= 4 if "layernorm" in modules else 0
    split = tp if p.sequence_parallel or tp == 1 else 1
    scale = L * b * h * weight_bytes / 2
    per_layer = scale * (coeff / tp if split == tp else 10 + (coeff - 10) / tp)
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    in_flight, layers = min(pp, microbatches), m.num_layers // pp
    if m.recompute_granularity == "full":
        # Full recomputation keeps each unit's input (2 bytes per element) and rebuilds one
        # unit's activations at a time in the backward pass.
        n = m.recompute_num_layers or 1
        kept_input = 2 * scale / split
        if (m.recompute_method or "uniform") == "uniform":
            activations = kept_input * -(-layers // n) * in_flight + per_layer * n
        else:
            n = min(n, layers)
            activations = (kept_input * n + per_layer * (layers - n)) * in_flight + per_layer
    else:
        activations = per_layer * layers * in_flight
    logits = L * b * vocab_size / tp * (2 + 4 + 4)
    return MemoryEstimate(
        params_on_gpu=round(params), weights=round(params * weight_bytes),
        gradients=round(params * 4), optimizer=round(optimizer),
        activations=round(activations), logits=round(logits))
