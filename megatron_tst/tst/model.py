"""``TSTGPTModel``: megatron's GPTModel that also takes TST bags and next-bag targets.

- First pipeline stage: ``(B, L, s)`` input ids are superposed (``tst/embedding.py``).
- Last pipeline stage: ``(B, L, s)`` labels make ``compute_language_model_loss`` return the
  multi-hot CE of the next bag, computed on megatron's ``[L, B, V/TP]`` logits in place (no
  transposed copy of the logits), vocab-parallel over the model's TP group.

``(B, S)`` ids and labels behave exactly as in GPTModel, so one model serves both phases and the
baseline; it has the same parameters and checkpoint keys as GPTModel.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from megatron_tst.tst.embedding import install_superposed_embedding
from megatron_tst.tst.loss import multi_hot_cross_entropy


class TSTGPTModel(GPTModel):
    def __init__(self, *args, slot_weights: torch.Tensor, loss_impl: str = "fused", **kwargs):
        super().__init__(*args, **kwargs)
        self.slot_weights = slot_weights  # (s,), sums to 1; not a parameter, not checkpointed
        self.bag_loss_impl = "vocab_parallel" if loss_impl == "fused" else loss_impl
        if self.pre_process:
            install_superposed_embedding(self)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if labels.dim() != 3:
            return super().compute_language_model_loss(labels, logits)
        # logits [L, B, V/TP], labels [B, L, s] -> a scalar: the paper's mean of per-slot CEs
        return multi_hot_cross_entropy(
            logits, labels.transpose(0, 1), self.slot_weights.to(logits.device),
            impl=self.bag_loss_impl, tp_group=self.pg_collection.tp)
