"""The run's data as one stream: its chunks, and which samples a step reads in either phase.

The dataset is cut in chunks of ``data_chunk x seq_length`` tokens (``data_chunk`` = ``s`` in a TST
run, else 1) in one shuffled order. A superposition step reads whole chunks (one sample of ``s*L``
tokens, folded into ``L`` bags); a recovery step (and validation) reads each chunk as
``data_chunk`` consecutive samples of ``L`` tokens. Both walk the same order, so the position in
the stream is one number, ``consumed_tokens``, in either phase, and a resume needs only that
number. This module is the one place that does this arithmetic and guards it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_tst.tst.schedule import SUPERPOSITION, Phase, PhaseSchedule


@dataclass(frozen=True)
class DataStream:
    seq_length: int  # L: model positions per sample
    data_chunk: int  # the stream is cut in chunks of data_chunk * L tokens
    schedule: PhaseSchedule
    global_batch_size: int
    eval_steps: int

    @classmethod
    def for_schedule(cls, schedule: PhaseSchedule, seq_length: int, global_batch_size: int,
                     eval_steps: int) -> "DataStream":
        return cls(seq_length, schedule.data_chunk, schedule, global_batch_size, eval_steps)

    # ----------------------------------------------------------------- what the dataset holds
    @property
    def chunk_tokens(self) -> int:
        """Tokens per dataset sample (one chunk)."""
        return self.data_chunk * self.seq_length

    @property
    def train_chunks(self) -> int:
        """Chunks the whole run reads (both phases)."""
        units = self.schedule.data_tokens(self.schedule.total_steps, self.global_batch_size,
                                          self.seq_length) // self.seq_length
        return math.ceil(units / self.data_chunk)

    @property
    def valid_chunks(self) -> int:
        """Chunks one evaluation reads (in the superposition phase it reads whole chunks)."""
        return self.eval_steps * self.global_batch_size

    # ------------------------------------------------------------------ what a step reads
    def sample_tokens(self, phase: Phase) -> int:
        return self.seq_length * phase.bag_size

    def step_tokens(self, phase: Phase) -> int:
        """Data tokens one optimizer step of ``phase`` reads (over all data-parallel ranks)."""
        return self.global_batch_size * self.sample_tokens(phase)

    def first_sample(self, consumed_tokens: int, phase: Phase) -> int:
        """Index (in ``view``'s samples) of the first sample a ``phase`` step at
        ``consumed_tokens`` reads. A superposition step must start on a chunk boundary."""
        if consumed_tokens % self.sample_tokens(phase):
            raise ValueError(
                f"the data position ({consumed_tokens} tokens) is not at a {phase.bag_size}-"
                f"sequence chunk boundary, so the {phase.name} phase cannot continue from it; "
                f"a superposition phase cannot follow recovery steps")
        return consumed_tokens // self.sample_tokens(phase)

    def view(self, dataset, phase: Phase) -> "ChunkView":
        """``dataset`` (of chunks) as the samples a ``phase`` step reads."""
        return ChunkView(dataset, self.data_chunk, phase.bag_size)

    # ----------------------------------------------------------------------------- resume
    def resume_problem(self, *, step: int, phase: str, consumed_tokens: int,
                       data_chunk: int) -> Optional[str]:
        """Why a checkpoint at this position cannot continue on this stream (None: it can)."""
        boundary = self.schedule.superposition_steps
        if phase not in (SUPERPOSITION, "") and boundary > step:
            return (f"the superposition phase would restart: the checkpoint is at step {step}, "
                    f"in the {phase} phase, and this recipe puts the switch after step "
                    f"{boundary} (tst.ratio / tst.superposition_steps); a run cannot go back to "
                    f"superposition")
        if consumed_tokens and data_chunk != self.data_chunk:
            return (f"the checkpoint read data in chunks of {data_chunk} x model.seq_length tokens, this run "
                    f"in chunks of {self.data_chunk}: the data position cannot be carried over. "
                    f"Keep tst.bag_size as in that run (end the superposition phase early with "
                    f"tst.superposition_steps), or start fresh with checkpoint.load=none")
        return None


class ChunkView:
    """Samples of ``bag_size`` consecutive sequence lengths cut from a dataset of chunks of
    ``data_chunk`` sequence lengths (see the module docstring); a map-style dataset for torch's
    DataLoader."""

    def __init__(self, chunks, data_chunk: int, bag_size: int):
        if data_chunk % bag_size:
            raise ValueError(f"a {bag_size}-sequence sample does not tile a {data_chunk}-sequence "
                             f"chunk")
        self.chunks, self.per_chunk = chunks, data_chunk // bag_size

    def __len__(self) -> int:
        return len(self.chunks) * self.per_chunk

    def __getitem__(self, index: int) -> dict:
        sample = self.chunks[index // self.per_chunk]
        if self.per_chunk == 1:
            return {k: sample[k] for k in ("tokens", "labels", "loss_mask")}
        n = len(sample["tokens"]) // self.per_chunk
        part = slice((index % self.per_chunk) * n, (index % self.per_chunk + 1) * n)
        return {k: sample[k][part] for k in ("tokens", "labels", "loss_mask")}
