"""PhaseSchedule: which phase (and bag size) an optimizer step runs in, and what it reads.

Steps ``0 .. S-1`` (0-based) are the superposition phase, ``S .. T-1`` the recovery phase, with
``S = round(r * T)`` (or ``tst.superposition_steps``). Every step runs ``B`` samples of ``L``
model positions, so the FLOPs per step are equal in both phases; a superposition step reads
``s * L`` data tokens per sample, a recovery step ``L``.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPERPOSITION, RECOVERY, STANDARD = "superposition", "recovery", "standard"


@dataclass(frozen=True)
class Phase:
    name: str  # superposition | recovery | standard (no superposition phase in this run)
    bag_size: int  # tokens per latent position: s in the superposition phase, else 1


@dataclass(frozen=True)
class PhaseSchedule:
    total_steps: int
    bag_size: int
    superposition_steps: int

    @property
    def is_tst(self) -> bool:
        return self.bag_size > 1 and self.superposition_steps > 0

    @property
    def data_chunk(self) -> int:
        """The data stream is cut in chunks of this many sequence lengths (s, or 1 without TST):
        see ``data/stream.py``."""
        return self.bag_size if self.is_tst else 1

    def phase(self, step: int) -> Phase:
        """The phase of the 0-based optimizer step ``step``."""
        if not self.is_tst:
            return Phase(STANDARD, 1)
        if step < self.superposition_steps:
            return Phase(SUPERPOSITION, self.bag_size)
        return Phase(RECOVERY, 1)

    def segment_end(self, step: int) -> int:
        """First step after ``step`` that runs in another phase (or total_steps)."""
        if self.is_tst and step < self.superposition_steps:
            return self.superposition_steps
        return self.total_steps

    def data_tokens(self, steps: int, global_batch_size: int, seq_length: int) -> int:
        """Data tokens read by the first ``steps`` steps (s times more per superposition step)."""
        sup = min(steps, self.superposition_steps) if self.is_tst else 0
        return (sup * self.bag_size + (steps - sup)) * global_batch_size * seq_length
