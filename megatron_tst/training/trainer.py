"""The training loop: components are built elsewhere; this file only wires and steps them.

A TST run is one loop over two phases (``tst/schedule.py``): superposition steps feed bags of
``s`` tokens and train on the multi-hot CE of the next bag; recovery steps are plain next-token
training. Optimizer state and the single WSD schedule carry over the switch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_tst import mcore
from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.config.loader import config_to_yaml
from megatron_tst.data.build import build_run_data, run_sample_counts
from megatron_tst.data.datasets import BatchLayout, ChunkView, iterate_microbatches
from megatron_tst.models.gpt import build_model_chunks, count_parameters, padded_vocab_size
from megatron_tst.models.sizing import flops_per_step
from megatron_tst.training import checkpoint as ckpt
from megatron_tst.training.distributed import init_distributed
from megatron_tst.training.faults import EXIT_NONFINITE, SpikeDetector, nonfinite_step
from megatron_tst.training.metrics import MetricsLogger, format_metrics, setup_logging
from megatron_tst.training.moe_metrics import moe_metrics
from megatron_tst.training.optim import (apply_optimizer_hyperparameters, build_optimizer,
                                        build_scheduler, connect_schedule_hooks, wrap_model)
from megatron_tst.training.resume import changes_schedule, check_resume
from megatron_tst.training.signals import (FAILED, FINISHED, PREEMPTED, STOPPED, TIME_LIMIT,
                                           ExitSignalHandler, write_exit_status)
from megatron_tst.training.step import (make_forward_step, make_superposition_forward_step,
                                        reduce_loss)
from megatron_tst.training.switch import apply_switch
from megatron_tst.tst.schedule import RECOVERY, SUPERPOSITION, Phase, PhaseSchedule

log = logging.getLogger("megatron_tst")


@dataclass
class TrainResult:
    step: int
    train_loss: Optional[float]
    valid_loss: Optional[float]
    checkpoint: Optional[str]
    consumed_tokens: int
    wall_time_s: float
    # finished | stopped (training.exit_at_step) | preempted (signal, time limit) | failed
    status: str = FINISHED
    signal: Optional[str] = None
    reason: Optional[str] = None  # signal | time_limit | nonfinite


class Trainer:
    def __init__(self, cfg: RunConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.cfg = cfg
        self.started = time.time()  # for training.time_limit_minutes
        self.longest_step_s = self.last_save_s = 0.0
        self.signals = ExitSignalHandler(cfg.training.exit_signals)  # recorded from here on
        self.env = init_distributed(cfg)
        self.signals.device = self.env.device
        setup_logging(self.env.rank, self.env.is_logging_rank)
        t, L = cfg.training, cfg.model.seq_length
        self.schedule = PhaseSchedule.from_config(cfg)
        self.layout = BatchLayout(t.global_batch_size, t.micro_batch_size,
                                  ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())

        # Data: chunks of c*L tokens (c = s in a TST run), read whole by superposition steps and
        # as c consecutive L-token samples by recovery steps and validation.
        c = self.schedule.chunk_tokens_factor
        sample_length, train_samples, valid_samples = run_sample_counts(cfg)
        self.data = build_run_data(cfg, sequence_length=sample_length,
                                   num_train_samples=train_samples, num_valid_samples=valid_samples)
        vocab = cfg.model.vocab_size or self.data.tokenizer.vocab_size
        if vocab < self.data.tokenizer.vocab_size:
            raise ConfigError(
                f"is smaller than the tokenizer's vocabulary ({self.data.tokenizer.vocab_size:,} "
                f"entries, {cfg.data.tokenizer.path or 'the demo tokenizer'}): token ids would "
                f"fall outside the embedding. Set model.vocab_size={self.data.tokenizer.vocab_size}"
                f" or null (the tokenizer's)", key="model.vocab_size", value=vocab)
        self.vocab_size = padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by,
                                            cfg.parallel.tensor_model_parallel_size)

        chunks = [c.to(self.env.device) for c in build_model_chunks(cfg, self.vocab_size)]
        self.num_params = sum(count_parameters(c) for c in chunks)
        self.model = [wrap_model(cfg, c, i) for i, c in enumerate(chunks)]
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        connect_schedule_hooks(self.model, self.optimizer)
        self.forward_backward = get_forward_backward_func()
        self.standard_step = make_forward_step(self.env.device)
        self.superposition_step = None
        if self.schedule.is_tst:
            self.superposition_step = make_superposition_forward_step(
                self.env.device, bag_size=cfg.tst.bag_size, vocab_size=self.vocab_size,
                eod=self.data.tokenizer.eod if cfg.tst.respect_documents else None)
        self.flops_per_step = flops_per_step(cfg, self.vocab_size)

        self.state = ckpt.TrainState(data_chunk=c, vocab_size=vocab)
        self.last_checkpoint: Optional[Path] = None
        self.saved_at: Optional[int] = None
        load_path = ckpt.resolve_load_path(cfg)
        accepted = []
        if load_path is not None:
            accepted = self._check_resume(load_path, vocab)
            self.state = ckpt.load_checkpoint(load_path, cfg, self.model, self.optimizer,
                                              self.scheduler)
            self.state.vocab_size = vocab
            self.last_checkpoint, self.saved_at = load_path, self.state.step
            self._check_data_position(load_path)
            apply_optimizer_hyperparameters(cfg, self.optimizer)
        self.metrics = MetricsLogger(cfg, enabled=self.env.is_logging_rank,
                                     resumed_step=self.state.step)
        if self.env.rank == 0:
            log.info("resolved config:\n%s", config_to_yaml(cfg))
            Path(cfg.resolved_run_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.resolved_run_dir) / "run_config.yaml").write_text(config_to_yaml(cfg))
        if self.env.rank == 0:
            log.info("megatron-core %s, torch %s, Python %s", mcore.installed(),
                     torch.__version__, mcore.python_line())
            if untested := mcore.tested_pair():
                log.warning(untested)
        sched = self.schedule
        log.info("model: %s parameters on this rank, vocab %d (padded), world size %d, "
                 "%d micro-batches per step", f"{self.num_params:,}", self.vocab_size,
                 self.env.world_size, self.layout.num_microbatches)
        if sched.is_tst:
            log.info("TST: superposition (s=%d) for steps 1-%d, recovery for steps %d-%d",
                     sched.bag_size, sched.superposition_steps, sched.superposition_steps + 1,
                     sched.total_steps)
        if load_path is not None:
            self.metrics.event(self.state.step, f"resumed from {load_path}")
            for change in accepted:
                self.metrics.event(self.state.step, f"resumed with {change.key}: "
                                                    f"{change.saved!r} -> {change.now!r}")

    def _check_resume(self, path: Path, vocab: int) -> list:
        """Refuse recipe changes that cannot carry over (``training/resume.py``); a rebuilt LR
        schedule when its keys were changed with checkpoint.allow_changes."""
        common = ckpt.load_common(path)
        saved = common["train_state"]
        accepted = check_resume(path, common["run_config"], saved["step"], saved["phase"],
                                self.cfg, saved.get("vocab_size", 0), vocab)
        if changes_schedule(accepted):
            self.scheduler.override_opt_param_scheduler = True
        return accepted

    def _check_data_position(self, path: Path) -> None:
        st, c = self.state, self.schedule.chunk_tokens_factor
        if st.consumed_tokens and st.data_chunk != c:
            raise ConfigError(
                f"checkpoint {path} read data in chunks of {st.data_chunk} x model.seq_length "
                f"tokens, this run in chunks of {c}: the data position cannot be carried over. "
                f"Keep tst.bag_size as in that run (end the superposition phase early with "
                f"tst.superposition_steps), or start fresh with checkpoint.load=none",
                key="tst.bag_size", value=self.cfg.tst.bag_size)

    # ------------------------------------------------------------------------------ steps
    def _run(self, forward_step, data_iterator, forward_only: bool):
        return self.forward_backward(
            forward_step_func=forward_step, data_iterator=data_iterator, model=self.model,
            num_microbatches=self.layout.num_microbatches, seq_length=self.cfg.model.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size, forward_only=forward_only)

    def train_step(self, forward_step, data_iterator) -> dict:
        """Forward, backward and (unless the loss or a gradient is non-finite) the update."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_dicts = self._run(forward_step, data_iterator, forward_only=False)
        loss = reduce_loss(loss_dicts)
        bad = nonfinite_step(loss, self.model, self.env.device, self.state.step + 1)
        lr = self.optimizer.param_groups[0]["lr"]
        metrics = {"loss": None if loss is None else loss.item(), "lr": lr}
        if bad["loss"] or bad["grad"]:
            metrics.update(grad_norm=None, skipped=True,
                           nonfinite=[k for k in ("loss", "grad") if bad[k]])
            if self.cfg.training.nonfinite == "skip":
                self.scheduler.step(increment=1)
            return metrics
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics.update(grad_norm=grad_norm, skipped=not ok)
        if self.cfg.model.num_moe_experts:
            metrics.update(moe_metrics(self.layout.num_microbatches))
        return metrics

    def _iterator(self, dataset, phase: Phase, start_tokens: int, num_steps: int,
                  workers: int = 0):
        L, c = self.cfg.model.seq_length, self.schedule.chunk_tokens_factor
        sample_tokens = L * phase.bag_size
        if start_tokens % sample_tokens:
            raise ConfigError(
                f"the data position ({start_tokens} tokens) is not at a {phase.bag_size}-sequence "
                f"chunk boundary, so the {phase.name} phase cannot continue from it; a "
                f"superposition phase cannot follow recovery steps",
                key="tst.superposition_steps", value=self.cfg.tst.superposition_steps)
        view = ChunkView(dataset, c, phase.bag_size)
        iterators = [iterate_microbatches(view, self.layout, start_tokens // sample_tokens,
                                          num_steps=num_steps, num_workers=workers)
                     for _ in self.model]  # the interleaved schedule reads one per model chunk
        return iterators[0] if len(iterators) == 1 else iterators

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Next-token loss on the held-out split; in the superposition phase also its MCE."""
        t = self.cfg.training
        runs = [("loss", self.standard_step, Phase(RECOVERY, 1))]
        if self.state.phase == SUPERPOSITION:  # the phase of the last completed step
            runs.append(("mce", self.superposition_step,
                         Phase(SUPERPOSITION, self.schedule.bag_size)))
        for chunk in self.model:
            chunk.eval()
        out = {}
        for key, forward_step, phase in runs:
            it = self._iterator(self.data.valid, phase, 0, t.eval_steps)
            loss_dicts = []
            for _ in range(t.eval_steps):
                loss_dicts += self._run(forward_step, it, forward_only=True)
            loss = reduce_loss(loss_dicts)
            if loss is not None:
                out[key] = loss.item()
        for chunk in self.model:
            chunk.train()
        if self.cfg.model.num_moe_experts:
            moe_metrics(1)  # drop what validation added to the router tracker
        return out

    def save(self) -> None:
        tic = time.time()
        with self.signals.blocked():
            self.last_checkpoint = ckpt.save_checkpoint(self.cfg, self.model, self.optimizer,
                                                        self.scheduler, self.state)
        self.last_save_s = time.time() - tic
        self.saved_at = self.state.step
        self.metrics.event(self.state.step, f"saved checkpoint {self.last_checkpoint}")

    # ------------------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        cfg, t, st, sched = self.cfg, self.cfg.training, self.state, self.schedule
        L, B = cfg.model.seq_length, t.global_batch_size
        start = time.time()
        stop = t.exit_at_step or t.train_steps
        train_loss = valid_loss = None
        evaluated_at = None  # same on every rank (the loss itself exists on the last stage only)
        it, current = None, None
        signals = self.signals
        spikes = SpikeDetector(t.loss_spike_sigma)
        self._write_status("running")
        outcome = None  # (status, reason, signal) when the loop ends early
        while st.step < stop:
            phase = sched.phase(st.step)
            if phase != current:
                if st.phase == SUPERPOSITION and phase.name == RECOVERY:
                    apply_switch(cfg, self.model, self.optimizer)
                    self.metrics.event(st.step, f"phase switch: superposition (s={sched.bag_size})"
                                                f" -> recovery after step {st.step}")
                current = phase
                steps = min(sched.segment_end(st.step), stop) - st.step
                it = self._iterator(self.data.train, phase, st.consumed_tokens, steps,
                                    cfg.data.num_workers)
                forward_step = (self.superposition_step if phase.name == SUPERPOSITION
                                else self.standard_step)
            tic = time.time()
            m = self.train_step(forward_step, it)
            elapsed = time.time() - tic
            self.longest_step_s = max(self.longest_step_s, elapsed)
            if m.get("nonfinite"):
                outcome = self._on_nonfinite(m)
                if outcome:
                    break
            st.step += 1
            st.consumed_samples += B
            st.consumed_tokens += B * L * phase.bag_size
            st.phase = phase.name
            m.update(phase=phase.name, bag_size=phase.bag_size, step_time_s=elapsed,
                     data_tokens=st.consumed_tokens, model_positions=st.consumed_samples * L,
                     tokens_per_s=B * L * phase.bag_size / elapsed, positions_per_s=B * L / elapsed,
                     flops=st.step * self.flops_per_step, skipped_steps=st.skipped_steps)
            train_loss = m["loss"] if m["loss"] is not None else train_loss
            spike = spikes.update(m["loss"], phase.name) if self.env.is_logging_rank else None
            if spike:
                m["loss_spike"] = not spike[1]
                self.metrics.event(st.step, spike[0]) if spike[1] else log.warning(
                    "step %d: %s", st.step, spike[0])
            self.metrics.log(st.step, m)
            if self.env.is_logging_rank and (st.step % t.log_interval == 0 or st.step == stop):
                log.info(format_metrics(st.step, t.train_steps, m))
            if t.eval_interval and (st.step % t.eval_interval == 0 or st.step == t.train_steps
                                    or st.step == sched.superposition_steps):
                valid_loss, evaluated_at = self._log_eval(), st.step
            interval = cfg.checkpoint.save_interval
            if (interval and st.step % interval == 0) or (
                    st.step == stop and (cfg.checkpoint.save_final or stop < t.train_steps)):
                self.save()
            received = signals.agreed(self._time_is_up())
            if received:
                outcome = self._stop_early(received)
                break
        signals.restore()
        if t.eval_interval and evaluated_at != st.step and not outcome:
            valid_loss = self._log_eval()
        self.metrics.close()
        status, reason, signal_name = outcome or (
            FINISHED if st.step >= t.train_steps else STOPPED, None, None)
        result = TrainResult(st.step, train_loss, valid_loss,
                             str(self.last_checkpoint) if self.last_checkpoint else None,
                             st.consumed_tokens, time.time() - start, status, signal_name, reason)
        self._write_status(status, result.checkpoint, signal_name, reason)
        return result

    def _time_is_up(self) -> bool:
        """training.time_limit_minutes: less time left than the longest step plus a save."""
        limit = self.cfg.training.time_limit_minutes
        if limit is None:
            return False
        left = limit * 60 - (time.time() - self.started)
        return left < self.longest_step_s + self.last_save_s

    def _stop_early(self, received: str) -> tuple:
        why = ("training.time_limit_minutes is near" if received == TIME_LIMIT
               else f"{received} received")
        log.warning("%s: saving at step %d and exiting with status 75 (resubmit to resume)",
                    why, self.state.step)
        if self.saved_at != self.state.step:
            self.save()
        self.metrics.event(self.state.step, f"stopped: {why}")
        if received == TIME_LIMIT:
            return PREEMPTED, TIME_LIMIT, None
        return PREEMPTED, "signal", received

    def _on_nonfinite(self, m: dict) -> Optional[tuple]:
        """Apply training.nonfinite to a step whose update was withheld; None to go on."""
        st, what = self.state, " and ".join(m["nonfinite"])
        step = st.step + 1
        if self.cfg.training.nonfinite == "skip":
            st.skipped_steps += 1
            log.warning("step %d: non-finite %s: update skipped (%d skipped so far; "
                        "training.nonfinite=skip)", step, what, st.skipped_steps)
            self.metrics.event(step, f"non-finite {what}: update skipped")
            return None
        log.error("step %d: non-finite %s: the weights are those after step %d; saving them and "
                  "stopping (exit status %d). Resume with training.nonfinite=skip to skip this "
                  "batch, or with a lower optimizer.lr (checkpoint.allow_changes=[optimizer.lr])",
                  step, what, st.step, EXIT_NONFINITE)
        self.metrics.event(step, f"non-finite {what}: stopped")
        if self.saved_at != st.step:
            self.save()
        return FAILED, "nonfinite", None

    def _write_status(self, status: str, checkpoint: Optional[str] = None,
                      signal_name: Optional[str] = None, reason: Optional[str] = None) -> None:
        """``exit_status.json`` for launchers: 'running' until the loop ends, so that a crash is
        never mistaken for a clean preemption."""
        if self.env.rank == 0:
            write_exit_status(self.cfg.resolved_run_dir, status=status, step=self.state.step,
                              train_steps=self.cfg.training.train_steps, checkpoint=checkpoint,
                              signal_name=signal_name, reason=reason)

    def _log_eval(self) -> Optional[float]:
        losses = self.evaluate()
        if self.env.is_logging_rank and losses:
            self.metrics.log(self.state.step, losses, kind="valid")
            extra = f" | validation MCE {losses['mce']:.4f}" if "mce" in losses else ""
            log.info("step %d/%d | validation loss %.4f%s", self.state.step,
                     self.cfg.training.train_steps, losses["loss"], extra)
        return losses.get("loss")


def train(cfg: RunConfig) -> TrainResult:
    return Trainer(cfg).fit()
