"""Superposed input embedding: the mean of the ``s`` token embeddings of each bag.

Installed by swapping the class of megatron's ``VocabParallelEmbedding`` inside the first pipeline
stage's ``LanguageModelEmbedding`` for a subclass: no new parameters, the same parameter names and
sharded checkpoint keys, and the rest of megatron's embedding path (transpose, sequence-parallel
scatter, dropout) unchanged. The model's input shape carries the phase:

- ``(B, S)`` token ids: the standard embedding;
- ``(B, L, s)`` bags: each latent position gets the mean of its ``s`` embeddings, summed in
  float32, divided by the bag's token count, cast back to the embedding dtype. Ids ``>= V``
  (``V`` = the padded vocabulary) mark tokens left out of the mean (``respect_documents``): their id
  is ``id - V``, encoded so that the mask travels with the input through megatron's schedules.

Under tensor parallelism the lookup is megatron's vocab-parallel one (all-reduce, or reduce-scatter
with sequence parallelism); the bag mean happens after it, on full embeddings. With sequence
parallelism the reduce-scatter splits the ``L*s`` flattened tokens into contiguous blocks of
whole bags, so each rank averages exactly its ``L/TP`` latent positions.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding


class SuperposedVocabParallelEmbedding(VocabParallelEmbedding):
    """``VocabParallelEmbedding`` that also accepts ``(B, L, s)`` bags of token ids."""

    def forward(self, input_):
        if input_.dim() != 3:
            return super().forward(input_)
        b, length, s = input_.shape
        vocab = self.num_embeddings
        keep = input_ < vocab
        ids = torch.where(keep, input_, input_ - vocab)
        emb = super().forward(ids.reshape(b, length * s))
        if self.reduce_scatter_embeddings:  # [L*s/TP, B, H], sequence-parallel shard
            local = emb.shape[0] // s
            emb = emb.view(local, s, b, -1)
            rank = torch.distributed.get_rank(self.tp_group)
            mine = keep[:, rank * local:(rank + 1) * local, :]  # [B, L/TP, s]
            weights = mine.permute(1, 2, 0).unsqueeze(-1)  # [L/TP, s, B, 1]
            bag_dim = 1
        else:  # [B, L*s, H]
            emb = emb.view(b, length, s, -1)
            weights = keep.unsqueeze(-1)
            bag_dim = 2
        return superpose(emb, weights, bag_dim)


def superpose(emb: torch.Tensor, weights: torch.Tensor, bag_dim: int) -> torch.Tensor:
    """Mean over ``bag_dim`` of the embeddings where ``weights`` is true, in float32."""
    w = weights.to(torch.float32)
    total = (emb.to(torch.float32) * w).sum(bag_dim)
    count = w.sum(bag_dim).clamp(min=1.0)
    return (total / count).to(emb.dtype)


def install_superposed_embedding(model: torch.nn.Module) -> bool:
    """Enable bag inputs on the model chunk holding the input embedding; False if it has none."""
    embedding = _find_embedding(model)
    if embedding is None:
        return False
    word = embedding.word_embeddings
    if not isinstance(word, SuperposedVocabParallelEmbedding):
        word.__class__ = SuperposedVocabParallelEmbedding
    return True


def _find_embedding(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    while not hasattr(model, "embedding") and hasattr(model, "module"):
        model = model.module  # DDP, Float16Module
    return getattr(model, "embedding", None)


def encode_bag_mask(inputs: torch.Tensor, input_mask: Optional[torch.Tensor],
                    vocab_size: int) -> torch.Tensor:
    """Bags with left-out tokens shifted by the padded vocabulary size (see module docstring)."""
    if input_mask is None:
        return inputs
    return torch.where(input_mask, inputs, inputs + vocab_size)
