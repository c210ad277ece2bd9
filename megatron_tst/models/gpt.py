"""Llama-style megatron-core ``GPTModel`` from a ``ModelConfig``.

RMSNorm, SwiGLU, RoPE, grouped-query attention, untied input embedding and LM head, optional
qk-norm and MoE. The layer spec is transformer-engine's when TE is importable and working,
megatron-core's local spec otherwise (CPU machines, or ``model.transformer_impl: local``).
"""

from __future__ import annotations

import logging
import re
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.plan import RunPlan

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_transformer_config(cfg: RunConfig, plan: Optional[RunPlan] = None):
    """megatron-core's ``TransformerConfig`` for ``cfg`` on this machine: the recipe's keys
    (``transformer_config_kwargs``), then ``megatron.transformer`` (fields no key sets), then the
    CPU settings where CUDA is absent."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = {**transformer_config_kwargs(cfg, plan or RunPlan.build(cfg)),
              **cfg.megatron.transformer}
    if not torch.cuda.is_available():
        from megatron_tst.compat import cpu_model_settings

        kwargs.update(cpu_model_settings())
    try:
        return TransformerConfig(**kwargs)
    except (ValueError, AssertionError, TypeError, NotImplementedError) as err:
        raise refused_by_megatron(cfg, "TransformerConfig", err) from None


def refused_by_megatron(cfg: RunConfig, what: str, err: Exception) -> ConfigError:
    """A megatron-core config's own check failing on the recipe's settings, as one line naming
    the recipe key of the first field its message mentions."""
    from megatron_tst.config.passthrough import OWNED

    message = str(err).strip() or type(err).__name__
    section = {"TransformerConfig": "transformer", "OptimizerConfig": "optimizer"}.get(what, "ddp")
    names = {**{f: k for f, k in OWNED[section].items() if "." in k.split(" ")[0]},
             **{f: f"megatron.{section}.{f}" for f in getattr(cfg.megatron, section)}}
    key = next((names[f] for f in sorted(names, key=len, reverse=True)
                if re.search(rf"\b{re.escape(f)}\b", message)),
               next((f"megatron.{section}.{f}" for f in getattr(cfg.megatron, section)), None))
    from megatron_tst.config.loader import config_source

    return ConfigError(f"megatron-core's {what} refuses these settings: {message}", key=key,
                       value=None if key is None else _recipe_value(cfg, key),
                       source=None if key is None else config_source(cfg, key))


def _recipe_value(cfg: RunConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return node


def transformer_config_kwargs(cfg: RunConfig, plan: RunPlan) -> dict:
    """The ``TransformerConfig`` fields the recipe sets (``config/passthrough.OWNED`` names the
    key of each, so ``megatron.transformer`` cannot set them a second time)."""
    m, p = cfg.model, cfg.parallel
    dtype = DTYPES[m.params_dtype]
    balancing = m.moe_router_load_balancing_type or (
        "aux_loss" if m.moe_aux_loss_coeff > 0 else "none")
    recompute = {}
    if m.recompute_granularity == "full":
        recompute = dict(recompute_granularity="full",
                         recompute_method=m.recompute_method or "uniform",
                         recompute_num_layers=m.recompute_num_layers or 1)
    elif m.recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective",
                         recompute_modules=list(m.recompute_modules or ["core_attn"]))
    fp8 = {}
    if m.fp8 is not None:
        fp8 = dict(fp8=m.fp8, fp8_recipe=m.fp8_recipe, fp8_param=m.fp8_param)
    return dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        qk_layernorm=m.qk_layernorm,
        no_rope_freq=m.no_rope_freq,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        num_moe_experts=m.num_moe_experts,
        moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        moe_grouped_gemm=m.moe_grouped_gemm,
        moe_router_load_balancing_type=balancing,
        moe_router_score_function=m.moe_router_score_function,
        moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=m.moe_router_bias_update_rate,
        moe_router_dtype=m.moe_router_dtype,
        moe_router_pre_softmax=m.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
        moe_z_loss_coeff=m.moe_z_loss_coeff,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        deallocate_pipeline_outputs=True,
        **recompute,
        **fp8,
        **plan.fusions,
    )


def build_layer_spec(cfg: RunConfig, impl: str):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    m = cfg.model
    if impl == "transformer_engine":
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=m.num_moe_experts, moe_grouped_gemm=m.moe_grouped_gemm,
            qk_layernorm=m.qk_layernorm)
    spec = specs.get_gpt_layer_local_spec(
        num_experts=m.num_moe_experts, moe_grouped_gemm=m.moe_grouped_gemm,
        qk_layernorm=m.qk_layernorm, normalization=m.normalization)
    if not cfg.parallel.sequence_parallel:
        return spec
    # Local spec + SP (CPU runs): norms whose params carry sequence_parallel, in every layer and
    # as the block's final norm.
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_tst.models.norms import SequenceParallelTorchNorm

    spec.submodules.input_layernorm = SequenceParallelTorchNorm
    spec.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    layers = m.num_layers // (cfg.parallel.pipeline_model_parallel_size
                              * (cfg.parallel.virtual_pipeline_model_parallel_size or 1))
    return TransformerBlockSubmodules(layer_specs=[spec] * layers,
                                      layer_norm=SequenceParallelTorchNorm)


def build_model_chunks(cfg: RunConfig, plan: RunPlan) -> list:
    """This rank's model chunks: one per virtual pipeline stage (one without interleaving), with
    the plan's padded vocabulary."""
    vp, vocab_size = cfg.parallel.virtual_pipeline_model_parallel_size, plan.padded_vocab_size
    if vp is None:
        return [build_model(cfg, vocab_size, plan=plan)]
    from megatron.core import parallel_state as ps

    return [build_model(cfg, vocab_size, plan=plan, vp_stage=i,
                        pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i),
                        post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i))
            for i in range(vp)]


def build_model(cfg: RunConfig, vocab_size: int, *, plan: Optional[RunPlan] = None,
                pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                vp_stage: Optional[int] = None):
    """One model chunk of ``vocab_size`` (padded) rows for this pipeline stage (parallel_state
    must be initialised). The plan (default: ``cfg``'s) says which model class
    (``RunPlan.bag_model``: ``TSTGPTModel``, same parameters, also takes bags), the slot weights
    and the transformer and loss implementations."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    plan = plan or RunPlan.build(cfg)
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    cls, extra = GPTModel, {}
    if plan.bag_model:
        from megatron_tst.tst.model import TSTGPTModel

        cls = TSTGPTModel
        extra = dict(slot_weights=plan.slot_weights, loss_impl=plan.loss_impl)
    model = cls(
        config=build_transformer_config(cfg, plan),
        transformer_layer_spec=build_layer_spec(cfg, plan.transformer_impl),
        vocab_size=vocab_size,
        max_sequence_length=cfg.model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not cfg.model.untie_embeddings,
        position_embedding_type=cfg.model.position_embedding,
        rotary_base=cfg.model.rotary_base,
        **({"vp_stage": vp_stage} if vp_stage is not None else {}),
        **extra,
    )
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
