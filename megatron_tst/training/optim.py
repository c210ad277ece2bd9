"""Megatron DDP wrapping, AdamW through ``get_megatron_optimizer``, and the WSD LR schedule.

One warmup-stable-decay schedule spans the whole run (both TST phases): linear warmup from 0 over
``schedule.warmup_steps``, constant ``optimizer.lr``, then decay to ``schedule.final_lr`` over the
last ``schedule.decay_fraction`` of ``training.train_steps``. megatron's scheduler counts optimizer
steps here: step ``k`` (0-based) trains with ``lr(k)``, so with warmup the first step's LR is 0.
"""

from __future__ import annotations

import torch

from megatron_tst.config import RunConfig
from megatron_tst.models.gpt import DTYPES


def wrap_model(cfg: RunConfig, model: torch.nn.Module, chunk_index: int = 0):
    """Float16Module for half-precision params, then megatron's DistributedDataParallel.

    Chunks after the first (interleaved pipeline) use one bucket, as in Megatron-LM.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config = model.config
    if cfg.model.params_dtype != "float32":
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # training/faults.py checks, then applies the policy
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model,
                                   disable_bucketing=chunk_index > 0)


def build_optimizer(cfg: RunConfig, model_chunks: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o, dtype = cfg.optimizer, DTYPES[cfg.model.params_dtype]
    config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=cfg.schedule.final_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
    )
    return get_megatron_optimizer(config, model_chunks)


def connect_schedule_hooks(model_chunks: list, optimizer) -> None:
    """Hand megatron's pipeline schedules the hooks Megatron-LM's trainer would set.

    Without ``finalize_model_grads_func`` the schedule never all-reduces the DDP grad buffers, so
    data-parallel ranks would silently step on their local gradients.
    """
    from megatron.core.distributed import finalize_model_grads

    config = model_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in model_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if getattr(model_chunks[0].ddp_config, "overlap_grad_reduce", False):
        grad_sync = [chunk.start_grad_sync for chunk in model_chunks]
        config.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
    if getattr(model_chunks[0].ddp_config, "overlap_param_gather", False):
        param_sync = [chunk.start_param_sync for chunk in model_chunks]
        config.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync


def inner_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron (possibly chained) optimizer."""
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if getattr(o, "optimizer", None) is not None]


def apply_optimizer_hyperparameters(cfg: RunConfig, optimizer) -> None:
    """Adam's betas and epsilon from the recipe (a loaded optimizer state carries its own): a
    no-op unless a resume changed them (checkpoint.allow_changes). LR and weight decay are set by
    the scheduler at every step."""
    o = cfg.optimizer
    for inner in inner_optimizers(optimizer):
        for group in inner.param_groups:
            group["betas"] = (o.adam_beta1, o.adam_beta2)
            group["eps"] = o.adam_eps
            if "max_lr" in group:  # megatron's per-group LR bounds, which its scheduler prefers
                group["max_lr"], group["min_lr"] = o.lr, cfg.schedule.final_lr


def build_scheduler(cfg: RunConfig, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t, s, o = cfg.training, cfg.schedule, cfg.optimizer
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=s.final_lr,
        lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=t.train_steps,
        lr_decay_style="WSD",
        wsd_decay_steps=round(s.decay_fraction * t.train_steps),
        lr_wsd_decay_style=s.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=t.train_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
    )
