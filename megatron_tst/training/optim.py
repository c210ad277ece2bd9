"""Megatron DDP wrapping, AdamW through ``get_megatron_optimizer``, the WSD LR schedule, and
``TrainingOptimizer``: the one adapter that holds every workaround around megatron's optimizer
(creating Adam's state before a load, per-parameter step counts after it, the recipe's
hyper-parameters on resume, a rebuilt LR schedule, the reset and reload at the TST switch).

One warmup-stable-decay schedule spans the whole run (both TST phases): linear warmup from 0 over
``schedule.warmup_steps``, constant ``optimizer.lr``, then decay to ``schedule.final_lr`` over the
last ``schedule.decay_fraction`` of ``training.train_steps``. megatron's scheduler counts optimizer
steps here: step ``k`` (0-based) trains with ``lr(k)``, so with warmup the first step's LR is 0.
"""

from __future__ import annotations

import collections
from typing import Optional

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
        **cfg.megatron.ddp,  # fields no recipe key sets (config/passthrough.py)
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
        **cfg.megatron.optimizer,  # fields no recipe key sets (config/passthrough.py)
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


def inner_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron (possibly chained) optimizer."""
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if getattr(o, "optimizer", None) is not None]


class TrainingOptimizer:
    """megatron's optimizer and LR scheduler for ``model_chunks``, and what megatron-tst does
    around them. ``.optimizer`` and ``.scheduler`` are megatron's own objects (their state dicts
    go into checkpoints unchanged)."""

    def __init__(self, cfg: RunConfig, model_chunks: list):
        self.cfg = cfg
        self.optimizer = build_optimizer(cfg, model_chunks)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        connect_schedule_hooks(model_chunks, self.optimizer)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> tuple[bool, Optional[float]]:
        """The update and the LR schedule's step: (applied, gradient norm)."""
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return ok, grad_norm

    def skip(self) -> None:
        """No update for this batch; the LR schedule still advances (training.nonfinite=skip)."""
        self.scheduler.step(increment=1)

    # -------------------------------------------------------------------------- checkpoints
    def prepare_load(self) -> None:
        """Create Adam's moment tensors before loading, so the sharded state dict has targets.

        A step with all-zero gradients on freshly built state; the loaded values overwrite it.
        """
        for inner in inner_optimizers(self.optimizer):
            if any(len(s) for s in inner.state.values()):
                continue
            for group in inner.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            saved_lrs = [g["lr"] for g in inner.param_groups]
            for g in inner.param_groups:
                g["lr"] = 0.0
            params = [p.detach().clone() for g in inner.param_groups for p in g["params"]]
            inner.step()
            with torch.no_grad():
                for p, saved in zip((p for g in inner.param_groups for p in g["params"]), params):
                    p.copy_(saved)
            for g, lr in zip(inner.param_groups, saved_lrs):
                g["lr"] = lr
            for group in inner.param_groups:
                for p in group["params"]:
                    p.grad = None

    def load(self, optimizer_state: Optional[dict], scheduler_state: dict, *,
             rebuild_schedule: bool = False) -> None:
        """Restore the loaded states (``optimizer_state`` None: fresh Adam moments). With
        ``rebuild_schedule`` the LR schedule is the recipe's (changed with
        checkpoint.allow_changes), continued from the saved step. Then the recipe's Adam betas,
        epsilon and LR bounds apply (a loaded state carries its own): a no-op unless a resume
        changed them."""
        if optimizer_state is not None:
            with torch.no_grad():  # the distributed optimizer copies into views of fp32 weights
                self.optimizer.load_state_dict(optimizer_state)
            self._sync_step_counts()
        self.scheduler.override_opt_param_scheduler = rebuild_schedule
        self.scheduler.load_state_dict(scheduler_state)
        o = self.cfg.optimizer
        for inner in inner_optimizers(self.optimizer):
            for group in inner.param_groups:
                group["betas"] = (o.adam_beta1, o.adam_beta2)
                group["eps"] = o.adam_eps
                if "max_lr" in group:  # megatron's per-group LR bounds, preferred by its scheduler
                    group["max_lr"], group["min_lr"] = o.lr, self.cfg.schedule.final_lr

    def _sync_step_counts(self) -> None:
        """torch's AdamW keeps a per-parameter ``step``; megatron saves it per param group."""
        for inner in inner_optimizers(self.optimizer):
            for group in inner.param_groups:
                if "step" not in group:
                    continue
                for p in group["params"]:
                    st = inner.state.get(p)
                    if st and "step" in st:
                        st["step"] = torch.as_tensor(group["step"], dtype=st["step"].dtype)

    # ----------------------------------------------------------------------- the TST switch
    def reset_state(self) -> None:
        """Fresh Adam moments and step counts (tst.reset_optimizer_at_switch)."""
        for inner in inner_optimizers(self.optimizer):
            inner.state = collections.defaultdict(dict)
            for group in inner.param_groups:
                group.pop("step", None)

    def reload_model_params(self) -> None:
        """Copy changed model weights into the fp32 main params where they are separate."""
        if hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()
