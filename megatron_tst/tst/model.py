"""``TSTGPTModel``: megatron's GPTModel that also takes TST bags and next-bag targets.

- First pipeline stage: ``(B, L, s)`` input ids are superposed (``tst/embedding.py``).
- Last pipeline stage: ``(B, L, s)`` labels make ``compute_language_model_loss`` return the
  multi-hot CE of the next bag, computed on megatron's ``[L, B, V/TP]`` logits in place (no
  transposed copy of the logits), vocab-parallel over the model's TP group
  (``loss.implementation: fused``, or ``reference`` at TP=1).
- With a fused-linear loss (``loss.implementation: chunked | triton``) the last stage computes no
  logits when labels are given: the final hidden states and the LM-head weight shard go straight
  to ``tst.linear_loss.linear_mce``, for bags (the MCE, a scalar) and for ``(B, S)`` labels (the
  per-token CE ``[B, S]``, as GPTModel returns it). Without labels (evaluation of logits,
  inference) and with MTP the model takes GPTModel's own path.

``(B, S)`` ids and labels behave exactly as in GPTModel, so one model serves both phases and the
baseline; it has the same parameters and checkpoint keys as GPTModel.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from megatron_tst.tst.embedding import install_superposed_embedding
from megatron_tst.tst.implementations import LINEAR_IMPLEMENTATIONS, LOGITS_IMPLEMENTATIONS
from megatron_tst.tst.linear_loss import linear_mce
from megatron_tst.tst.loss import element_weights, multi_hot_cross_entropy


class TSTGPTModel(GPTModel):
    def __init__(self, *args, slot_weights: torch.Tensor, loss_impl: str = "fused", **kwargs):
        """``loss_impl``: a resolved ``loss.implementation`` (``tst/implementations.py``)."""
        super().__init__(*args, **kwargs)
        if loss_impl not in LOGITS_IMPLEMENTATIONS and loss_impl not in LINEAR_IMPLEMENTATIONS:
            raise ValueError(f"unknown loss implementation {loss_impl!r}")
        self.slot_weights = slot_weights  # (s,), sums to 1; not a parameter, not checkpointed
        self.loss_impl = loss_impl
        if self.pre_process:
            install_superposed_embedding(self)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if labels.dim() != 3:
            return super().compute_language_model_loss(labels, logits)
        # logits [L, B, V/TP], labels [B, L, s] -> a scalar: the paper's mean of per-slot CEs.
        # A fused-linear loss_impl gets here only when the logits exist anyway (GPTModel's own
        # path, see _postprocess): the loss on them is the fused one, the same value.
        impl = self.loss_impl if self.loss_impl in LOGITS_IMPLEMENTATIONS else "fused"
        return multi_hot_cross_entropy(
            logits, labels.transpose(0, 1), self.slot_weights.to(logits.device),
            impl=impl, tp_group=self.pg_collection.tp)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        if (self.loss_impl not in LINEAR_IMPLEMENTATIONS or labels is None or not self.post_process
                or kwargs.get("mtp_in_postprocess") or self.config.mtp_num_layers is not None
                or kwargs.get("inference_context") is not None):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels,
                                        *args, **kwargs)
        return self._linear_loss(hidden_states, labels)

    def _linear_loss(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss from the final hidden states [S(/TP), B, H] and the LM-head weight shard."""
        from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region,
                                                   gather_from_sequence_parallel_region)

        layer = self.output_layer
        run_forward_pre_hooks(layer, hidden_states)
        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else layer.weight)
        tp = self.pg_collection.tp
        # As ColumnParallelLinear: the input gradient is summed over the TP ranks (reduce-scatter
        # after the sequence-parallel all-gather, or an all-reduce).
        if layer.sequence_parallel:
            hidden_states = gather_from_sequence_parallel_region(hidden_states, group=tp)
        elif tp.size() > 1:
            hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp)
        length, batch, width = hidden_states.shape
        h = hidden_states.reshape(length * batch, width)
        if labels.dim() == 3:  # bags [B, L, s]: the MCE, a scalar
            t = labels.transpose(0, 1).reshape(length * batch, -1)
            w = element_weights(t, self.slot_weights.to(t.device))
            return linear_mce(h, weight, t, w, impl=self.loss_impl, tp_group=tp)
        # tokens [B, S]: the per-token CE [B, S], as GPTModel returns it
        t = labels.transpose(0, 1).reshape(-1, 1)
        w = torch.ones(t.shape, dtype=torch.float32, device=t.device)
        per_token = linear_mce(h, weight, t, w, impl=self.loss_impl, tp_group=tp, reduction="none")
        return per_token.view(length, batch).transpose(0, 1).contiguous()


def run_forward_pre_hooks(module: torch.nn.Module, *args) -> None:
    """Run ``module``'s forward pre-hooks as its ``forward`` would, for a caller that uses its
    weight without calling it. megatron's DDP with ``overlap_param_gather`` waits there for the
    asynchronous all-gather of the module's (distributed-optimizer) parameters and dispatches the
    next bucket's: skipped, the weight could be stale and the next step's dispatch asserts."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if key in module._forward_pre_hooks_with_kwargs:
            hook(module, args, {})
        else:
            hook(module, args)
