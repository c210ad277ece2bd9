"""The training loop: components are built elsewhere; this file only wires and steps them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_tst.config import RunConfig
from megatron_tst.config.loader import config_to_yaml
from megatron_tst.data.build import build_run_data
from megatron_tst.data.datasets import BatchLayout, iterate_microbatches
from megatron_tst.models.gpt import build_model, count_parameters, padded_vocab_size
from megatron_tst.training import checkpoint as ckpt
from megatron_tst.training.distributed import init_distributed
from megatron_tst.training.metrics import MetricsLogger, format_metrics, setup_logging
from megatron_tst.training.optim import (build_optimizer, build_scheduler, connect_schedule_hooks,
                                        wrap_model)
from megatron_tst.training.step import make_forward_step, reduce_loss

log = logging.getLogger("megatron_tst")


@dataclass
class TrainResult:
    step: int
    train_loss: Optional[float]
    valid_loss: Optional[float]
    checkpoint: Optional[str]
    consumed_tokens: int
    wall_time_s: float


class Trainer:
    def __init__(self, cfg: RunConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg = cfg
        self.env = init_distributed(cfg)
        setup_logging(self.env.rank, self.env.is_logging_rank)
        t = cfg.training
        self.layout = BatchLayout(t.global_batch_size, t.micro_batch_size,
                                  ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        self.data = build_run_data(
            cfg, sequence_length=cfg.model.seq_length,
            num_train_samples=t.train_steps * t.global_batch_size,
            num_valid_samples=t.eval_steps * t.global_batch_size)
        vocab = cfg.model.vocab_size or self.data.tokenizer.vocab_size
        self.vocab_size = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by,
                                            cfg.parallel.tensor_model_parallel_size)
        model = build_model(cfg, self.vocab_size).to(self.env.device)
        self.num_params = count_parameters(model)
        self.model = [wrap_model(cfg, model)]
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        connect_schedule_hooks(self.model, self.optimizer)
        self.forward_backward = get_forward_backward_func()
        self.forward_step = make_forward_step(self.env.device)
        self.state = ckpt.TrainState()
        self.last_checkpoint: Optional[Path] = None
        load_path = ckpt.resolve_load_path(cfg)
        if load_path is not None:
            self.state = ckpt.load_checkpoint(load_path, cfg, self.model, self.optimizer,
                                              self.scheduler)
            self.last_checkpoint = load_path
        self.metrics = MetricsLogger(cfg, enabled=self.env.is_logging_rank,
                                     resumed_step=self.state.step)
        if self.env.rank == 0:
            log.info("resolved config:\n%s", config_to_yaml(cfg))
            Path(cfg.resolved_run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.resolved_run_dir) / "run_config.yaml").write_text(config_to_yaml(cfg))
        log.info("model: %s parameters on this rank, vocab %d (padded), world size %d, "
                 "%d micro-batches per step", f"{self.num_params:,}", self.vocab_size,
                 self.env.world_size, self.layout.num_microbatches)
        if load_path is not None:
            self.metrics.event(self.state.step, f"resumed from {load_path}")

    # ------------------------------------------------------------------------------ steps
    def _run(self, data_iterator, num_microbatches: int, forward_only: bool):
        t = self.cfg.training
        return self.forward_backward(
            forward_step_func=self.forward_step, data_iterator=data_iterator, model=self.model,
            num_microbatches=num_microbatches, seq_length=self.cfg.model.seq_length,
            micro_batch_size=t.micro_batch_size, forward_only=forward_only)

    def train_step(self, data_iterator) -> dict:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_dicts = self._run(data_iterator, self.layout.num_microbatches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(increment=1)
        loss = reduce_loss(loss_dicts)
        return {"loss": None if loss is None else loss.item(), "lr": lr,
                "grad_norm": grad_norm, "skipped": not ok}

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        t = self.cfg.training
        it = iterate_microbatches(self.data.valid, self.layout, 0, num_steps=t.eval_steps)
        for chunk in self.model:
            chunk.eval()
        loss_dicts = []
        for _ in range(t.eval_steps):
            loss_dicts += self._run(it, self.layout.num_microbatches, forward_only=True)
        for chunk in self.model:
            chunk.train()
        loss = reduce_loss(loss_dicts)
        return None if loss is None else loss.item()

    def save(self) -> None:
        self.last_checkpoint = ckpt.save_checkpoint(self.cfg, self.model, self.optimizer,
                                                    self.scheduler, self.state)
        self.metrics.event(self.state.step, f"saved checkpoint {self.last_checkpoint}")

    # ------------------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        cfg, t, st = self.cfg, self.cfg.training, self.state
        start, tokens_per_step = time.time(), t.global_batch_size * cfg.model.seq_length
        stop = t.exit_at_step or t.train_steps
        it = iterate_microbatches(self.data.train, self.layout, st.consumed_samples,
                                  num_workers=cfg.data.num_workers)
        train_loss = valid_loss = None
        while st.step < stop:
            tic = time.time()
            m = self.train_step(it)
            st.step += 1
            st.consumed_samples += t.global_batch_size
            st.consumed_tokens += tokens_per_step
            m["step_time_s"] = time.time() - tic
            m["tokens_per_s"] = tokens_per_step / m["step_time_s"]
            m["consumed_tokens"] = st.consumed_tokens
            train_loss = m["loss"] if m["loss"] is not None else train_loss
            self.metrics.log(st.step, m)
            if self.env.is_logging_rank and (st.step % t.log_interval == 0 or st.step == stop):
                log.info(format_metrics(st.step, t.train_steps, m))
            if t.eval_interval and (st.step % t.eval_interval == 0 or st.step == t.train_steps):
                valid_loss = self._log_eval()
            interval = cfg.checkpoint.save_interval
            if (interval and st.step % interval == 0) or (
                    st.step == stop and (cfg.checkpoint.save_final or stop < t.train_steps)):
                self.save()
        if valid_loss is None and t.eval_interval:
            valid_loss = self._log_eval()
        self.metrics.close()
        return TrainResult(st.step, train_loss, valid_loss,
                           str(self.last_checkpoint) if self.last_checkpoint else None,
                           st.consumed_tokens, time.time() - start)

    def _log_eval(self) -> Optional[float]:
        loss = self.evaluate()
        if self.env.is_logging_rank and loss is not None:
            self.metrics.log(self.state.step, {"loss": loss}, kind="valid")
            log.info("step %d/%d | validation loss %.4f", self.state.step,
                        self.cfg.training.train_steps, loss)
        return loss


def train(cfg: RunConfig) -> TrainResult:
    return Trainer(cfg).fit()
