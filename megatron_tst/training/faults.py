"""Numerical faults: non-finite losses and gradients, and loss spikes.

``nonfinite_step`` runs after the backward pass and before the optimizer step: every rank checks
its own loss (the last pipeline stage has one) and its gradient buffers, and one MAX all-reduce
makes the verdict global, so all ranks skip or stop at the same step. Megatron DDP's own NaN
check raises from inside the schedule; this one leaves the weights untouched and lets the
``training.nonfinite`` policy decide: ``skip`` (no update for this batch, counted) or ``stop``
(save the last good state and exit with ``EXIT_NONFINITE``).

``SpikeDetector`` watches the training loss of the logging rank: a loss far above the median of
the recent window (in robust standard deviations) is flagged; the jump where the TST phase
switches (the loss changes from multi-hot CE to next-token CE) is expected and reported as such.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tst.training import failpoints

log = logging.getLogger("megatron_tst")

EXIT_NONFINITE = 3  # stopped on a non-finite loss or gradient after saving the last good state


def nonfinite_step(loss: Optional[torch.Tensor], model_chunks, device: torch.device,
                   step: int) -> dict:
    """{'loss': bool, 'grad': bool} for the whole job (a collective: every rank calls it);
    ``step`` is the 1-based step being trained (for the ``grad:nan`` failpoint)."""
    if failpoints.active("grad:nan", step) and (not dist.is_initialized() or dist.get_rank() == 0):
        _grad_buffers(model_chunks[0])[0].grad_data.view(-1)[0] = float("nan")
    local_loss = loss is not None and not bool(torch.isfinite(loss).all())
    local_grad = any(not bool(torch.isfinite(buffer.grad_data).all())
                     for chunk in model_chunks for buffer in _grad_buffers(chunk))
    if local_loss or local_grad:
        log.warning("rank %d: non-finite %s", dist.get_rank() if dist.is_initialized() else 0,
                    " and ".join(n for n, bad in (("loss", local_loss), ("gradients", local_grad))
                                 if bad))
    flags = torch.tensor([int(local_loss), int(local_grad)], dtype=torch.int64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return {"loss": bool(flags[0]), "grad": bool(flags[1])}


def _grad_buffers(chunk) -> list:
    return list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))


class SpikeDetector:
    """Robust z-score of the training loss against a window of recent steps of the same phase."""

    def __init__(self, sigma: float, window: int = 50, min_history: int = 10):
        self.sigma, self.min_history = sigma, min_history
        self.history: deque[float] = deque(maxlen=window)
        self.phase: Optional[str] = None

    def update(self, loss: Optional[float], phase: str) -> Optional[tuple[str, bool]]:
        """(message, expected) when the loss jumps, else None."""
        if loss is None or not math.isfinite(loss) or self.sigma <= 0:
            return None
        previous = self.history[-1] if self.history else None
        if phase != self.phase:
            switched = self.phase is not None
            self.phase = phase
            self.history.clear()
            self.history.append(loss)
            if switched:
                return (f"loss {previous:.4f} -> {loss:.4f} at the switch to the {phase} phase "
                        f"(expected: the loss changes from multi-hot to next-token CE)", True)
            return None
        message = None
        if len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            mad = statistics.median(abs(x - median) for x in self.history)
            scale = max(1.4826 * mad, 1e-3 * abs(median), 1e-6)
            z = (loss - median) / scale
            if z > self.sigma:
                message = (f"loss spike: {loss:.4f} against a median of {median:.4f} over the "
                           f"last {len(self.history)} steps ({z:.1f} robust sigmas)")
        self.history.append(loss)
        return (message, False) if message else None
