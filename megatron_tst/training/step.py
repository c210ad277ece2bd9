"""One micro-batch through the model, in the shape megatron's pipeline schedules expect.

``forward_step(data_iterator, model) -> (output, loss_func)``; on the last pipeline stage
``loss_func(output) -> (loss, {"lm_loss": [sum, count]})``. The summed form lets the trainer
average over micro-batches and data-parallel ranks weighted by tokens.

Two forward steps: the standard one (next-token CE through GPTModel's vocab-parallel loss) and
the superposition one (bags in, logits out, multi-hot CE over the next bag). ``PipelineRunner``
runs a global batch of either through megatron's pipeline schedule, for training and (forward
only) for validation and ``megatron-tst eval``.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional

import torch

from megatron_tst.tst.bags import fold_bags
from megatron_tst.tst.embedding import encode_bag_mask


def make_forward_step(device: torch.device):
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        loss_mask = batch["loss_mask"].to(device, non_blocking=True)
        position_ids = _positions(tokens)
        # With labels, GPTModel returns the per-token CE [B, S], computed vocab-parallel.
        output = model(tokens, position_ids, attention_mask=None, labels=labels)
        return output, partial(token_loss, loss_mask)

    return forward_step


def make_superposition_forward_step(device: torch.device, *, bag_size: int, vocab_size: int,
                                    eod: Optional[int] = None):
    """Bags of ``bag_size`` tokens in, the multi-hot CE of the next bag out (``TSTGPTModel``).

    ``eod`` set means respect document boundaries (see ``tst.bags.fold_bags``).
    """

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        bags = fold_bags(batch["tokens"], batch["labels"], bag_size,
                         loss_mask=batch["loss_mask"], eod=eod)
        inputs = encode_bag_mask(bags.inputs, bags.input_mask, vocab_size).to(device)
        targets = bags.targets.to(device, non_blocking=True)
        loss = model(inputs, _positions(inputs[..., 0]), attention_mask=None, labels=targets)
        return loss, superposition_loss

    return forward_step


class PipelineRunner:
    """megatron's forward-backward schedule over this rank's model chunks, one global batch per
    call (``num_microbatches`` micro-batches of ``micro_batch_size`` samples)."""

    def __init__(self, model_chunks: list, *, seq_length: int, micro_batch_size: int,
                 num_microbatches: int):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.model, self.schedule = model_chunks, get_forward_backward_func()
        self.seq_length, self.micro_batch_size = seq_length, micro_batch_size
        self.num_microbatches = num_microbatches

    def iterators(self, make: Callable[[], Iterator]):
        """The data iterator(s) the schedule takes: one per model chunk (the interleaved
        schedule reads each chunk's micro-batches from its own), each made by ``make``."""
        iterators = [make() for _ in self.model]
        return iterators[0] if len(iterators) == 1 else iterators

    def __call__(self, forward_step, data_iterator, *, forward_only: bool) -> list[dict]:
        """The loss dicts of the micro-batches (on the last pipeline stage; [] elsewhere)."""
        return self.schedule(
            forward_step_func=forward_step, data_iterator=data_iterator, model=self.model,
            num_microbatches=self.num_microbatches, seq_length=self.seq_length,
            micro_batch_size=self.micro_batch_size, forward_only=forward_only)


def superposition_loss(loss: torch.Tensor):
    """The MCE is already a scalar mean (per slot, as in the paper); report it per micro-batch."""
    return loss, {"lm_loss": torch.stack([loss.detach().float(), torch.ones_like(loss, dtype=torch.float32)])}


def _positions(tokens: torch.Tensor) -> torch.Tensor:
    b, length = tokens.shape[:2]
    return torch.arange(length, device=tokens.device).unsqueeze(0).expand(b, length)


def token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.reshape(-1).float()
    total = (per_token_loss.float().reshape(-1) * mask).sum()
    count = mask.sum()
    loss = total / count.clamp(min=1.0)
    return loss, {"lm_loss": torch.stack([total.detach(), count])}


def reduce_loss(loss_dicts: list[dict], key: str = "lm_loss") -> torch.Tensor | None:
    """Token-weighted mean over micro-batches and the data-parallel group (last stage only)."""
    from megatron.core import parallel_state

    if not loss_dicts:
        return None
    summed = torch.stack([d[key] for d in loss_dicts]).sum(0).to(torch.float64)
    torch.distributed.all_reduce(
        summed, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return summed[0] / summed[1].clamp(min=1.0)
