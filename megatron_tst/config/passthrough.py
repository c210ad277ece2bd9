"""The ``megatron:`` recipe section: any other megatron-core setting, by its megatron-core name.

``megatron.transformer`` goes to ``TransformerConfig``, ``megatron.optimizer`` to
``OptimizerConfig`` and ``megatron.ddp`` to ``DistributedDataParallelConfig``, after the fields
megatron-tst sets itself (``models/gpt.py``, ``training/optim.py``). Names are checked against the
installed megatron-core's own dataclass fields: an unknown name gets a did-you-mean from that
list; a field that a recipe key (or megatron-tst itself) sets is refused with that key, so one
setting never has two places. Values are checked against the field's type where it is a plain
one (bool, int, float, str, a Literal, a list, optional or not); megatron-core's own checks of
combinations run when ``check_megatron_settings`` builds the three configs at start-up.

megatron-core is imported only when a recipe uses the section (its import takes seconds).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Union

from megatron_tst.config.errors import ConfigError

_MODEL_KEYS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "ffn_hidden_size", "qk_layernorm", "no_rope_freq", "init_method_std", "hidden_dropout",
    "attention_dropout", "params_dtype", "num_moe_experts", "moe_router_topk",
    "moe_ffn_hidden_size", "moe_aux_loss_coeff", "moe_token_dispatcher_type", "moe_grouped_gemm",
    "moe_router_load_balancing_type", "moe_router_score_function",
    "moe_router_enable_expert_bias", "moe_router_bias_update_rate", "moe_router_dtype",
    "moe_router_pre_softmax", "moe_router_topk_scaling_factor", "moe_z_loss_coeff",
    "moe_shared_expert_intermediate_size", "recompute_granularity", "recompute_method",
    "recompute_num_layers", "recompute_modules", "fp8", "fp8_recipe", "fp8_param",
    "bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
    "apply_rope_fusion", "gradient_accumulation_fusion", "moe_permute_fusion", "normalization")
_PARALLEL_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                  "virtual_pipeline_model_parallel_size", "expert_model_parallel_size",
                  "sequence_parallel", "context_parallel_size", "use_distributed_optimizer",
                  "overlap_grad_reduce", "overlap_param_gather")
_TRAINER = "megatron-tst's trainer (connect_schedule_hooks)"

#: megatron-core field -> the recipe key that sets it (or who sets it), per section.
OWNED: dict[str, dict[str, str]] = {
    "transformer": {
        **{k: f"model.{k}" for k in _MODEL_KEYS},
        **{k: f"parallel.{k}" for k in _PARALLEL_KEYS if k not in (
            "use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather")},
        "layernorm_epsilon": "model.norm_epsilon",
        "gated_linear_unit": "model.activation",
        "activation_func": "model.activation",
        "add_bias_linear": "megatron-tst (Llama-style layers have no linear biases)",
        "pipeline_dtype": "model.params_dtype",
        "bf16": "model.params_dtype",
        "fp16": "model.params_dtype",
        "deallocate_pipeline_outputs": "megatron-tst (always on)",
        "finalize_model_grads_func": _TRAINER, "grad_scale_func": _TRAINER,
        "no_sync_func": _TRAINER, "grad_sync_func": _TRAINER, "param_sync_func": _TRAINER,
        "timers": _TRAINER,
    },
    "optimizer": {
        "optimizer": "megatron-tst (AdamW)",
        "lr": "optimizer.lr", "min_lr": "schedule.final_lr",
        "weight_decay": "optimizer.weight_decay", "adam_beta1": "optimizer.adam_beta1",
        "adam_beta2": "optimizer.adam_beta2", "adam_eps": "optimizer.adam_eps",
        "clip_grad": "optimizer.clip_grad", "bf16": "model.params_dtype",
        "fp16": "model.params_dtype", "params_dtype": "model.params_dtype",
        "use_distributed_optimizer": "parallel.use_distributed_optimizer",
        "overlap_param_gather": "parallel.overlap_param_gather",
    },
    "ddp": {
        "grad_reduce_in_fp32": "megatron-tst (gradients are reduced in fp32)",
        "overlap_grad_reduce": "parallel.overlap_grad_reduce",
        "overlap_param_gather": "parallel.overlap_param_gather",
        "use_distributed_optimizer": "parallel.use_distributed_optimizer",
        "check_for_nan_in_grad": "training.nonfinite (megatron-tst checks every step)",
    },
}


def megatron_classes() -> dict[str, type]:
    """The megatron-core config dataclass of each section (imports megatron-core)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.transformer_config import TransformerConfig

    return {"transformer": TransformerConfig, "optimizer": OptimizerConfig,
            "ddp": DistributedDataParallelConfig}


def check_names(section: Any) -> None:
    """Refuse unknown fields, fields a recipe key sets, and values of the wrong type in the
    ``megatron`` section ``section`` (a ``MegatronConfig``)."""
    classes = megatron_classes()
    for name, cls in classes.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for field_name, value in getattr(section, name).items():
            key = f"megatron.{name}.{field_name}"
            owner = OWNED[name].get(field_name)
            if owner is not None:
                fix = (f"set {owner} instead" if "." in owner.split(" ")[0]
                       else f"it is set by {owner}")
                raise ConfigError(f"{cls.__name__}.{field_name} is a recipe setting: {fix}",
                                  key=key, value=value)
            if field_name not in fields:
                near = difflib.get_close_matches(field_name, list(fields), n=1, cutoff=0.6)
                hint = (f"did you mean megatron.{name}.{near[0]}?" if near else
                        f"see the fields of megatron.core's {cls.__name__}")
                raise ConfigError(f"megatron-core's {cls.__name__} (installed release) has no "
                                  f"field {field_name!r}; {hint}", key=key, value=value)
            expected = _type_error(fields[field_name].type, value)
            if expected:
                raise ConfigError(f"{cls.__name__}.{field_name} expects {expected}",
                                  key=key, value=value)


def _type_error(tp: Any, value: Any) -> str | None:
    """None when ``value`` fits the plain type ``tp`` (or ``tp`` is not a plain type), else what
    was expected."""
    if isinstance(tp, str):  # a postponed annotation: not checked here
        return None
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = [_type_error(a, value) for a in args if a is not type(None)]
        return None if any(e is None for e in errors) else " or ".join(e for e in errors if e)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return None if value in choices else f"one of {', '.join(map(repr, choices))}"
    if origin in (list, tuple) or tp in (list, tuple):
        return None if isinstance(value, list) else "a list"
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if tp is float:
        return (None if isinstance(value, (int, float)) and not isinstance(value, bool)
                else "a number")
    if tp is str:
        return None if isinstance(value, str) else "a string"
    return None
