"""The training loop: components are built elsewhere; this file only wires and steps them.

A TST run is one loop over two phases (``tst/schedule.py``): superposition steps feed bags of
``s`` tokens and train on the multi-hot CE of the next bag; recovery steps are plain next-token
training. Optimizer state and the single WSD schedule carry over the switch. Every decision
derived from the recipe is in the ``RunPlan`` (``plan.py``); what happens around a step (exit
signals, time limit, non-finite steps, loss spikes, the status file) is in
``training/policies.py``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_tst import mcore
from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.config.loader import config_to_yaml
from megatron_tst.data.build import build_run_data, run_tokenizer_vocab
from megatron_tst.data.datasets import iterate_microbatches
from megatron_tst.models.gpt import build_model_chunks, count_parameters
from megatron_tst.models.sizing import flops_per_step
from megatron_tst.plan import RunPlan
from megatron_tst.training import async_save
from megatron_tst.training import checkpoint as ckpt
from megatron_tst.training import console
from megatron_tst.training import failpoints
from megatron_tst.training.distributed import init_distributed
from megatron_tst.training.downstream import DownstreamEvals
from megatron_tst.training.faults import nonfinite_step
from megatron_tst.training.metrics import MetricsLogger, format_metrics, setup_logging
from megatron_tst.training.moe_metrics import moe_metrics
from megatron_tst.training.optim import TrainingOptimizer, wrap_model
from megatron_tst.training.perf import PerfMonitor, format_timers
from megatron_tst.training.policies import (NonFinitePolicy, Outcome, SpikeWatch, StatusFile,
                                            StopConditions)
from megatron_tst.training.profiler import StepProfiler
from megatron_tst.training.resume import changes_schedule, check_resume
from megatron_tst.training.rundir import lock_run_dir, write_run_config
from megatron_tst.training.signals import FAILED, FINISHED, STOPPED
from megatron_tst.training.step import (PipelineRunner, make_forward_step,
                                        make_superposition_forward_step, reduce_loss)
from megatron_tst.training.switch import apply_switch
from megatron_tst.training.watchdog import HangWatchdog
from megatron_tst.tst.schedule import RECOVERY, SUPERPOSITION, Phase

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
    skipped_steps: int = 0  # updates withheld (training.nonfinite=skip), over the whole run


class Trainer:
    """``initializer``: what reads ``checkpoint.init_from`` (``export/init_from.py``, given by the
    CLI: it converts Hugging Face models, a layer above training), with ``check(cfg, plan)`` ->
    source, ``prepare(source, cfg, rank)`` -> source and ``load(source, model_chunks)``."""

    def __init__(self, cfg: RunConfig, plan: Optional[RunPlan] = None, initializer=None):
        from megatron.core import parallel_state as ps

        self.cfg = cfg
        self.stop = StopConditions(cfg)  # exit signals are recorded from here on
        self.lock = lock_run_dir(cfg, int(os.environ.get("RANK", 0)))  # refuses a second run
        self.env = init_distributed(cfg)
        self.stop.signals.device = self.env.device
        setup_logging(self.env.rank, self.env.is_logging_rank)  # training/console.py
        # Every check that can refuse the run comes before the run directory is written to (the
        # demo data, megatron's index cache, metrics, run_config.yaml).
        vocab, name = run_tokenizer_vocab(cfg)
        self.plan = (plan or RunPlan.build(cfg, self.env.world_size)).with_vocab(vocab, name)
        saved = ckpt.resolve_load_path(cfg)
        accepted = check_resume(saved, self.plan) if saved is not None else []
        self.init, self.initializer = None, initializer  # checkpoint.init_from: a fresh run's
        if saved is None and cfg.checkpoint.init_from:  # weights
            if initializer is None:
                raise ConfigError("is read by `megatron-tst train`, not by this caller",
                                  key="checkpoint.init_from", value=cfg.checkpoint.init_from)
            self.init = initializer.check(cfg, self.plan)
        self.data = build_run_data(cfg, self.plan.stream)
        if self.data.tokenizer.vocab_size != vocab:
            raise ConfigError(f"the run's tokenizer has {self.data.tokenizer.vocab_size:,} entries, "
                              f"{vocab:,} expected ({name})", key="data.tokenizer.path",
                              value=cfg.data.tokenizer.path)
        self.stream, self.schedule = self.plan.stream, self.plan.schedule
        self.layout = self.plan.layout.batch_layout(ps.get_data_parallel_rank())

        chunks = [c.to(self.env.device) for c in build_model_chunks(cfg, self.plan)]
        if self.init is not None:
            initializer.load(initializer.prepare(self.init, cfg, self.env.rank), chunks)
        self.num_params = sum(count_parameters(c) for c in chunks)
        self.model = [wrap_model(cfg, c, i) for i, c in enumerate(chunks)]
        self.optimizer = TrainingOptimizer(cfg, self.model)
        self.runner = PipelineRunner(self.model, seq_length=cfg.model.seq_length,
                                     micro_batch_size=cfg.training.micro_batch_size,
                                     num_microbatches=self.layout.num_microbatches)
        self.forward_steps = {False: make_forward_step(self.env.device)}
        if self.schedule.is_tst:
            self.forward_steps[True] = make_superposition_forward_step(
                self.env.device, bag_size=self.schedule.bag_size,
                vocab_size=self.plan.padded_vocab_size,
                eod=self.data.tokenizer.eod if cfg.tst.respect_documents else None)
        self.flops_per_step = flops_per_step(cfg, self.plan.padded_vocab_size)
        self.perf = PerfMonitor(cfg, self.env.device, self.env.world_size, self.env.rank,
                                self.flops_per_step, announce=self.env.is_logging_rank)
        self.profiler = StepProfiler(cfg.training.profile, self.env.rank,
                                     Path(cfg.resolved_run_dir))

        self.state = ckpt.TrainState(data_chunk=self.stream.data_chunk,
                                     vocab_size=self.plan.vocab_size, tokenizer_vocab=vocab)
        self.last_checkpoint: Optional[Path] = None  # the last complete one
        self.saved_at: Optional[int] = None  # the step of the last save, complete or pending
        async_save.start_results_queue()
        self.background = None
        if cfg.checkpoint.async_save:
            # the next step's forward and backward run beside the CPU's copy of a saved state,
            # except where the forward writes parameters (gathered from other DP ranks)
            self.background = ckpt.BackgroundSaves(
                overlap_snapshot=not cfg.parallel.overlap_param_gather)
            config = self.model[0].config  # megatron calls it before the optimizer step
            config.finalize_model_grads_func = self.background.released_before(
                config.finalize_model_grads_func)
        if saved is not None:
            self._load(saved, accepted)
        self.metrics = MetricsLogger(cfg, enabled=self.env.is_logging_rank,
                                     resumed_step=self.state.step)
        self.nonfinite = NonFinitePolicy(cfg.training, self.metrics)
        self.spikes = SpikeWatch(cfg.training.loss_spike_sigma, self.metrics,
                                 self.env.is_logging_rank)
        self.status = StatusFile(cfg, self.env.rank)
        self.downstream = DownstreamEvals(cfg, self.env.is_logging_rank)  # evaluation.downstream
        self._announce(saved, accepted)
        if self.init is not None:
            self.metrics.event(0, f"initialized the model weights from {self.init.describe()}")
        self.watchdog = HangWatchdog(  # training/watchdog.py: beat() wherever progress is made
            cfg.training.hang_timeout_minutes, cfg.resolved_run_dir, self.env.rank,
            cfg.training.train_steps,
            lambda: (self.state.step, self.last_checkpoint and str(self.last_checkpoint),
                     self.state.skipped_steps),
            backend=self.env.backend, process_group_minutes=cfg.parallel.timeout_minutes)

    def _load(self, saved, accepted: list) -> None:
        """Load the checkpoint the resume checks accepted (``training/resume.py``)."""
        self.state = ckpt.load_checkpoint(saved, self.cfg, self.model, self.optimizer,
                                          rebuild_schedule=changes_schedule(accepted))
        self.state.vocab_size = self.plan.vocab_size
        self.state.tokenizer_vocab = self.data.tokenizer.vocab_size
        self.last_checkpoint, self.saved_at = saved.path, self.state.step

    def _announce(self, saved, accepted: list) -> None:
        """The run may write its directory now: this rank's log file (``training/console.py``)
        gets the records kept since the start, rank 0 writes run_config.yaml, the logging rank
        prints the run header."""
        log_path = console.open_run_log(self.cfg)
        if self.env.rank == 0:
            log.info("resolved config:\n%s", config_to_yaml(self.cfg), extra=console.FILE_ONLY)
            write_run_config(self.cfg)
            if untested := mcore.tested_pair():
                log.warning(untested)
        log.info("model: %s parameters on this rank, %d micro-batches per step",
                 f"{self.num_params:,}", self.layout.num_microbatches, extra=console.FILE_ONLY)
        if self.env.is_logging_rank:
            log.info(console.run_header(self.cfg, self.plan, log_path), extra=console.HEADER)
        if saved is not None:
            self.metrics.event(self.state.step, f"resumed from {saved.path}")
            for change in accepted:
                self.metrics.event(self.state.step, f"resumed with {change.key}: "
                                                    f"{change.saved!r} -> {change.now!r}")

    # ------------------------------------------------------------------------------ steps
    def train_step(self, phase: Phase, data_iterator) -> dict:
        """Forward, backward and (unless the loss or a gradient is non-finite) the update."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        forward_step = self.forward_steps[phase.name == SUPERPOSITION]
        timers = self.perf.timers
        with timers.time("forward_backward"), self.perf.straggler:
            loss = reduce_loss(self.runner(forward_step, timers.data(data_iterator),
                                           forward_only=False))
        bad = nonfinite_step(loss, self.model, self.env.device, self.state.step + 1)
        metrics = {"loss": None if loss is None else loss.item(), "lr": self.optimizer.lr}
        if bad["loss"] or bad["grad"]:
            metrics.update(grad_norm=None, skipped=True,
                           nonfinite=[k for k in ("loss", "grad") if bad[k]])
            if self.cfg.training.nonfinite == "skip":
                self.optimizer.skip()
            return metrics
        with timers.time("optimizer"):
            ok, grad_norm = self.optimizer.step()
        metrics.update(grad_norm=grad_norm, skipped=not ok)
        if self.cfg.model.num_moe_experts:
            metrics.update(moe_metrics(self.layout.num_microbatches))
        return metrics

    def _batches(self, dataset, phase: Phase, start_tokens: int, num_steps: int,
                 workers: int = 0):
        """Micro-batches of ``phase`` for ``num_steps`` steps from data position
        ``start_tokens`` (``data/stream.py``)."""
        view = self.stream.view(dataset, phase)
        first = self.stream.first_sample(start_tokens, phase)
        return self.runner.iterators(lambda: iterate_microbatches(
            view, self.layout, first, num_steps=num_steps, num_workers=workers))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Next-token loss on the held-out split; in the superposition phase also its MCE.
        {} when an exit signal or the time limit interrupts it."""
        runs = [("loss", Phase(RECOVERY, 1))]
        if self.state.phase == SUPERPOSITION:  # the phase of the last completed step
            runs.append(("mce", Phase(SUPERPOSITION, self.schedule.bag_size)))
        for chunk in self.model:
            chunk.eval()
        out = {}
        for key, phase in runs:
            loss, interrupted = self._validation_loss(phase)
            if interrupted:
                out = {}
                break
            if loss is not None:
                out[key] = loss
        for chunk in self.model:
            chunk.train()
        if self.cfg.model.num_moe_experts:
            moe_metrics(1)  # drop what validation added to the router tracker
        return out

    def _validation_loss(self, phase: Phase) -> tuple[Optional[float], bool]:
        """(loss over training.eval_steps batches of ``phase``, interrupted). The stop
        conditions are checked after every batch, so a signal is honoured within one batch."""
        steps = self.cfg.training.eval_steps
        batches = self._batches(self.data.valid, phase, 0, steps)
        forward_step = self.forward_steps[phase.name == SUPERPOSITION]
        loss_dicts = []
        for _ in range(steps):
            loss_dicts += self.runner(forward_step, batches, forward_only=True)
            self.watchdog.beat()
            failpoints.signal_if("eval:signal", self.state.step)
            if self.stop.check():
                return None, True
        loss = reduce_loss(loss_dicts)
        return (None if loss is None else loss.item()), False

    def save(self, wait: bool = False) -> None:
        """Save the state after this step; with ``checkpoint.async_save`` in the background
        (``wait``: until complete, for an exit). A pending background save is completed first."""
        tic = time.time()
        self.watchdog.beat()
        self._finish_saves(wait=True)
        self._sync_params()
        try:
            with self.stop.signals.blocked(), self.perf.timers.time("save"):
                path = ckpt.save_checkpoint(self.cfg, self.model, self.optimizer, self.state,
                                            protect=self.nonfinite.protected,
                                            background=self.background)
        except ckpt.SaveError as err:
            self._save_failed(err)
        self.watchdog.beat()
        self.saved_at = self.state.step
        if self.background is None:
            self.stop.last_save_s = time.time() - tic
            self._saved(path)
        elif wait:
            self._finish_saves(wait=True)

    def _sync_params(self) -> None:
        """With ``parallel.overlap_param_gather`` the distributed optimizer's updated shards
        reach the other ranks' parameters during the next forward: gather them now, before
        the parameters are saved (as Megatron-LM does before a save)."""
        if self.cfg.parallel.overlap_param_gather:
            for chunk in self.model:
                chunk.start_param_sync(force_sync=True)

    def _evaluate_downstream(self) -> None:
        """Save this step's weights for ``evaluation.downstream`` and start their evaluation."""
        self.watchdog.beat()
        self._sync_params()

        def save_weights(root: Path) -> Path:
            with self.stop.signals.blocked(), self.perf.timers.time("downstream"):
                return ckpt.save_model_checkpoint(self.cfg, [c.module for c in self.model],
                                                  self.state, root, {"downstream": True})

        self.downstream.launch(self.state.step, save_weights)
        self.watchdog.beat()

    def _finish_saves(self, wait: bool = False) -> None:
        """Complete a pending background save if every rank's writer is done (``wait``: block
        until it is): a collective, called at the same steps on every rank."""
        if self.background is None or self.background.pending is None:
            return
        self.watchdog.beat()
        try:
            path = self.background.poll(wait=wait)
        except ckpt.SaveError as err:
            self._save_failed(err)
        self.watchdog.beat()
        if path is not None:
            self.stop.last_save_s = self.background.duration_s
            self._saved(path)

    def _saved(self, path: Path) -> None:
        self.last_checkpoint = path
        self.metrics.event(self.state.step, f"saved checkpoint {path}")

    def _save_failed(self, err: "ckpt.SaveError") -> None:
        log.error("step %d: %s", self.state.step, err)
        self.metrics.event(self.state.step, f"save failed: {err.reason}")
        self.metrics.close()
        self.status.write(FAILED, self.state.step, self.last_checkpoint and
                          str(self.last_checkpoint), None, err.reason, self.state.skipped_steps)
        raise err

    def _save_if_needed(self) -> None:
        """Before an early exit: the state after this step saved, and complete."""
        if self.saved_at != self.state.step:
            self.save(wait=True)
        elif self.background is not None and self.background.pending is not None:
            log.info("waiting for the background save of %s", self.background.pending.name)
            self._finish_saves(wait=True)

    # ------------------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        t, st = self.cfg.training, self.state
        start, stop_at = time.time(), t.exit_at_step or t.train_steps
        train_loss = valid_loss = evaluated_at = None  # evaluated_at: the same on every rank
        phase, batches, outcome = None, None, None
        self.status.write("running", st.step)
        self.perf.start()
        while st.step < stop_at:
            upcoming = self.schedule.phase(st.step)
            self.profiler.begin(st.step + 1, upcoming)
            if upcoming != phase:
                phase, batches = self._enter_phase(phase, stop_at)
            tic = time.time()
            m = self.train_step(phase, batches)
            self.watchdog.beat()
            elapsed = time.time() - tic
            self.stop.longest_step_s = max(self.stop.longest_step_s, elapsed)
            if not m.get("nonfinite"):
                self.nonfinite.trained()
            elif outcome := self.nonfinite(m, st, self._save_if_needed, self.last_checkpoint):
                break
            self._advance(phase, m, elapsed)
            if trace := self.profiler.end(st.step):
                self.metrics.event(st.step, f"profiler trace written to {trace}")
            train_loss = m["loss"] if m["loss"] is not None else train_loss
            if t.eval_interval and (st.step % t.eval_interval == 0 or st.step == t.train_steps
                                    or st.step == self.schedule.superposition_steps):
                valid_loss, evaluated_at = self._log_eval(), st.step
            interval = self.cfg.checkpoint.save_interval
            if (interval and st.step % interval == 0) or (
                    st.step == stop_at and (self.cfg.checkpoint.save_final or stop_at < t.train_steps)):
                self.save()
            self._finish_saves()
            if self.downstream.due(st.step, phase.name, st.step == t.train_steps):
                self._evaluate_downstream()
            self.downstream.poll(self.metrics)
            if received := self.stop.check():
                outcome = self._stop_early(received)
                break
        self.stop.signals.restore()
        if trace := self.profiler.close():  # the run ended inside the profiled steps
            self.metrics.event(st.step, f"profiler trace (cut short) written to {trace}")
        if t.eval_interval and evaluated_at != st.step and not outcome:
            valid_loss = self._log_eval()
        self._finish_saves(wait=True)  # the final save, written during the final evaluation
        if self.background is not None:
            self.background.close()
        if outcome:  # an early exit: a resumed run logs or restarts them
            self.downstream.close()
        else:
            self.downstream.poll(self.metrics, wait=True, beat=self.watchdog.beat)
        ckpt.wait_for_removals()  # pruned checkpoints still being deleted
        self.metrics.close()
        status, reason, signal_name = outcome or (
            FINISHED if st.step >= t.train_steps else STOPPED, None, None)
        result = TrainResult(st.step, train_loss, valid_loss,
                             str(self.last_checkpoint) if self.last_checkpoint else None,
                             st.consumed_tokens, time.time() - start, status, signal_name, reason,
                             st.skipped_steps)
        self.watchdog.close()
        self.status.write(status, st.step, result.checkpoint, signal_name, reason,
                          st.skipped_steps)
        if self.lock is not None:
            self.lock.release()
        return result

    def _enter_phase(self, previous: Optional[Phase], stop_at: int):
        """The phase of the next step and its batches; at the TST switch, the switch."""
        st, sched = self.state, self.schedule
        phase = sched.phase(st.step)
        if st.phase == SUPERPOSITION and phase.name == RECOVERY:
            if self.background is not None:
                self.background.release()  # the switch may change the saved state
            apply_switch(self.cfg, self.model, self.optimizer)
            self.metrics.event(st.step, f"phase switch: superposition (s={sched.bag_size})"
                                        f" -> recovery after step {st.step}")
        steps = min(sched.segment_end(st.step), stop_at) - st.step
        return phase, self._batches(self.data.train, phase, st.consumed_tokens, steps,
                                    self.cfg.data.num_workers)

    def _advance(self, phase: Phase, m: dict, elapsed: float) -> None:
        """Count the step in the train state, complete and log its metrics."""
        st, t, L = self.state, self.cfg.training, self.cfg.model.seq_length
        B = t.global_batch_size
        st.step += 1
        st.consumed_samples += B
        st.consumed_tokens += self.stream.step_tokens(phase)
        st.phase, st.bag_size = phase.name, phase.bag_size
        m.update(phase=phase.name, bag_size=phase.bag_size, step_time_s=elapsed,
                 data_tokens=st.consumed_tokens, model_positions=st.consumed_samples * L,
                 tokens_per_s=self.stream.step_tokens(phase) / elapsed,
                 positions_per_s=B * L / elapsed, flops=st.step * self.flops_per_step,
                 skipped_steps=st.skipped_steps)
        stop_at = t.exit_at_step or t.train_steps
        m.update(self.perf.step(st.step, elapsed, stop_at))
        logged = st.step % t.log_interval == 0 or st.step == stop_at  # the same on every rank
        if logged:
            m.update(self.perf.interval())  # timers and memory over the ranks: a collective
        self.spikes(st.step, m)
        self.metrics.log(st.step, m)
        if self.env.is_logging_rank and logged:
            log.info(format_metrics(st.step, t.train_steps, m))
            if timers := format_timers(st.step, m):  # the log file; metrics.jsonl has them too
                log.info(timers, extra=console.FILE_ONLY)

    def _stop_early(self, received: str) -> Outcome:
        why = self.stop.describe(received)
        log.warning("%s: saving at step %d and exiting with status 75 (resubmit to resume)",
                    why, self.state.step)
        self._save_if_needed()
        self.metrics.event(self.state.step, f"stopped: {why}")
        return self.stop.outcome(received)

    def _log_eval(self) -> Optional[float]:
        tic = time.time()
        with self.perf.timers.time("eval"):
            losses = self.evaluate()
        self.stop.longest_eval_s = max(self.stop.longest_eval_s, time.time() - tic)
        if self.env.is_logging_rank and losses:
            self.metrics.log(self.state.step, losses, kind="valid")
            extra = f" | validation MCE {losses['mce']:.4f}" if "mce" in losses else ""
            log.info("step %d/%d | validation loss %.4f%s", self.state.step,
                     self.cfg.training.train_steps, losses["loss"], extra)
        return losses.get("loss")


def train(cfg: RunConfig, plan: Optional[RunPlan] = None, initializer=None) -> TrainResult:
    trainer = Trainer(cfg, plan, initializer)
    try:
        return trainer.fit()
    finally:  # an exception ends the loop too: the watchdog must not fire after it
        trainer.watchdog.close()
        if trainer.background is not None:  # a no-op after fit() closed it
            trainer.background.close(abort=True)
        trainer.downstream.close()  # evaluations still running after an exception
        ckpt.wait_for_removals()
