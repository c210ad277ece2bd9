"""What the training loop does besides stepping: small policy objects it calls after each step.

- ``StopConditions``: ``training.exit_signals`` and ``training.time_limit_minutes`` (save, exit 75);
- ``NonFinitePolicy``: ``training.nonfinite`` for a step whose loss or gradients are not finite;
- ``SpikeWatch``: ``training.loss_spike_sigma``, loss spikes flagged in the metrics;
- ``StatusFile``: ``<run_dir>/exit_status.json`` for launchers.

Each returns an ``Outcome`` when the loop must end early; the mechanisms they use live in
``training/signals.py`` (signal handling, the status file) and ``training/faults.py``.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, NamedTuple, Optional

from megatron_tst.config import RunConfig
from megatron_tst.training.faults import EXIT_NONFINITE, SpikeDetector
from megatron_tst.training.metrics import MetricsLogger
from megatron_tst.training.signals import (FAILED, PREEMPTED, TIME_LIMIT, ExitSignalHandler,
                                           write_exit_status)

log = logging.getLogger("megatron_tst")


class Outcome(NamedTuple):
    """How a loop that ended early ended."""

    status: str  # preempted | failed
    reason: str  # signal | time_limit | nonfinite
    signal: Optional[str] = None


class StopConditions:
    """Exit signals and the time limit. The signal handlers record from construction (before the
    slow set-up, so a signal then is not lost); ``check()`` is a collective every rank calls
    after each step, so all ranks stop at the same step."""

    def __init__(self, cfg: RunConfig):
        self.started = time.time()
        self.limit_s = (None if cfg.training.time_limit_minutes is None
                        else cfg.training.time_limit_minutes * 60)
        self.signals = ExitSignalHandler(cfg.training.exit_signals)
        self.longest_step_s = self.longest_eval_s = self.last_save_s = 0.0

    def time_is_up(self) -> bool:
        """Less time left than the longest step, the longest evaluation and the last save took
        together (the next step may be followed by both)."""
        if self.limit_s is None:
            return False
        left = self.limit_s - (time.time() - self.started)
        return left < self.longest_step_s + self.longest_eval_s + self.last_save_s

    def check(self) -> Optional[str]:
        """The agreed signal name, ``TIME_LIMIT``, or None to go on."""
        return self.signals.agreed(self.time_is_up())

    @staticmethod
    def outcome(received: str) -> Outcome:
        if received == TIME_LIMIT:
            return Outcome(PREEMPTED, TIME_LIMIT)
        return Outcome(PREEMPTED, "signal", received)

    @staticmethod
    def describe(received: str) -> str:
        return ("training.time_limit_minutes is near" if received == TIME_LIMIT
                else f"{received} received")


class NonFinitePolicy:
    """``training.nonfinite``: ``skip`` the update (counted) or ``stop`` after saving. Skipping
    is bounded: past ``training.max_consecutive_skips`` in a row or ``training.max_skipped_steps``
    in the run it stops as ``stop`` would. ``protected`` is the checkpoint saved before the
    current streak of skipped steps: retention keeps it until a step trains again."""

    def __init__(self, training, metrics: MetricsLogger):
        self.mode, self.metrics = training.nonfinite, metrics
        self.max_consecutive, self.max_total = (training.max_consecutive_skips,
                                                training.max_skipped_steps)
        self.consecutive = 0
        self.protected = None

    def trained(self) -> None:
        """A step whose update was applied: the streak of skipped steps is over."""
        self.consecutive, self.protected = 0, None

    def __call__(self, m: dict, state, save_if_needed: Callable[[], None],
                 last_checkpoint=None) -> Optional[Outcome]:
        """Apply the policy to the step after ``state.step`` whose update was withheld."""
        what, step = " and ".join(m["nonfinite"]), state.step + 1
        if self.mode == "skip":
            state.skipped_steps += 1
            self.consecutive += 1
            if self.consecutive == 1:
                self.protected = last_checkpoint
            limit = ("training.max_consecutive_skips", self.max_consecutive, self.consecutive) \
                if self.consecutive > self.max_consecutive else \
                ("training.max_skipped_steps", self.max_total, state.skipped_steps) \
                if state.skipped_steps > self.max_total else None
            if limit is None:
                log.warning("step %d: non-finite %s: update skipped (%d skipped so far; "
                            "training.nonfinite=skip)", step, what, state.skipped_steps)
                self.metrics.event(step, f"non-finite {what}: update skipped")
                return None
            key, bound, count = limit
            log.error("step %d: non-finite %s: %d skipped steps exceed %s=%d: the run is not "
                      "training; saving and stopping (exit status %d). Resume from %s with a "
                      "lower optimizer.lr (checkpoint.allow_changes=[optimizer.lr])", step, what,
                      count, key, bound, EXIT_NONFINITE,
                      self.protected or "the last checkpoint before the skips")
            self.metrics.event(step, f"non-finite {what}: stopped after {count} skipped steps")
            save_if_needed()
            return Outcome(FAILED, "nonfinite")
        log.error("step %d: non-finite %s: the weights are those after step %d; saving them and "
                  "stopping (exit status %d). Resume with training.nonfinite=skip to skip this "
                  "batch, or with a lower optimizer.lr (checkpoint.allow_changes=[optimizer.lr])",
                  step, what, state.step, EXIT_NONFINITE)
        self.metrics.event(step, f"non-finite {what}: stopped")
        save_if_needed()
        return Outcome(FAILED, "nonfinite")


class SpikeWatch:
    """Flags loss spikes in the step's metrics; the jump at the TST switch is an event."""

    def __init__(self, sigma: float, metrics: MetricsLogger, enabled: bool):
        self.detector, self.metrics, self.enabled = SpikeDetector(sigma), metrics, enabled

    def __call__(self, step: int, m: dict) -> None:
        spike = self.detector.update(m["loss"], m["phase"]) if self.enabled else None
        if not spike:
            return
        message, expected = spike
        m["loss_spike"] = not expected
        if expected:
            self.metrics.event(step, message)
        else:
            log.warning("step %d: %s", step, message)


class StatusFile:
    """``exit_status.json`` (global rank 0): 'running' until the loop ends, so that a crash is
    never mistaken for a clean preemption."""

    def __init__(self, cfg: RunConfig, rank: int):
        self.run_dir, self.train_steps, self.enabled = (cfg.resolved_run_dir,
                                                        cfg.training.train_steps, rank == 0)

    def write(self, status: str, step: int, checkpoint: Optional[str] = None,
              signal_name: Optional[str] = None, reason: Optional[str] = None,
              skipped_steps: int = 0) -> None:
        if self.enabled:
            write_exit_status(self.run_dir, status=status, step=step,
                              train_steps=self.train_steps, checkpoint=checkpoint,
                              signal_name=signal_name, reason=reason,
                              skipped_steps=skipped_steps)
