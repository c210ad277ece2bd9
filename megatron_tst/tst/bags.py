"""Fold ``s*L``-token samples into ``L`` bags of ``s`` tokens and their next-bag targets.

Exactly as TST-METHOD.md: inputs are the ``s*L`` tokens viewed as ``(B, L, s)``; targets are the
usual next-token labels (length ``s*L``) shifted left by ``s-1`` more, padded with the ignore
index and viewed as ``(B, L, s)``. So latent position ``j`` predicts bag ``j+1``, and the last
latent position has one real target (the token right after the window) and ``s-1`` ignored slots.

With ``respect_documents`` nothing crosses an end-of-document token: the bag's representative
document is the one its last token belongs to (an EOD belongs to the document it ends); input
tokens of other documents are masked out of the bag's mean, and target tokens of other documents
are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_tst.tst.vocab_shard import IGNORE_INDEX


@dataclass
class Bags:
    inputs: torch.Tensor  # (B, L, s) token ids
    targets: torch.Tensor  # (B, L, s) token ids of the next bag, IGNORE_INDEX where ignored
    input_mask: Optional[torch.Tensor] = None  # (B, L, s) bool: tokens that enter the bag mean


def fold_bags(tokens: torch.Tensor, labels: torch.Tensor, bag_size: int,
              loss_mask: Optional[torch.Tensor] = None, eod: Optional[int] = None) -> Bags:
    """``tokens``/``labels``/``loss_mask``: (B, s*L) as megatron's GPTDataset gives them
    (``labels[i] == tokens[i+1]``). ``eod`` set means respect document boundaries."""
    s = bag_size
    b, n = tokens.shape
    if n % s:
        raise ValueError(f"sample length {n} is not a multiple of the bag size {s}")
    length = n // s
    targets = labels.clone()
    if loss_mask is not None:
        targets[loss_mask == 0] = IGNORE_INDEX
    pad = targets.new_full((b, s - 1), IGNORE_INDEX)
    targets = torch.cat([targets[:, s - 1:], pad], dim=1).view(b, length, s)
    inputs = tokens.view(b, length, s)
    if eod is None:
        return Bags(inputs, targets)

    # doc[i]: number of EODs strictly before position i of the window (EOD ends its document).
    window = torch.cat([tokens, labels[:, -1:]], dim=1)  # the s*L + 1 tokens
    is_eod = (window == eod).long()
    doc = torch.cumsum(is_eod, dim=1) - is_eod
    in_doc = doc[:, :n].view(b, length, s)
    anchor = in_doc[:, :, -1:]  # the document of each bag's last token
    input_mask = in_doc == anchor
    # target slot (j, k) is token j*s + k + s of the window
    tgt_doc = torch.cat([doc[:, s:], doc.new_full((b, s - 1), -1)], dim=1).view(b, length, s)
    targets = targets.masked_fill(tgt_doc != anchor, IGNORE_INDEX)
    return Bags(inputs, targets, input_mask)
