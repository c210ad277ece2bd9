"""The names of the MCE loss implementations, and which one runs on this machine.

One set of names, the recipe's (``loss.implementation``), used by ``loss.multi_hot_cross_entropy``
(``impl=``), ``linear_loss.linear_mce`` (``impl=``) and ``model.TSTGPTModel`` (``loss_impl=``):

* ``reference`` -- materialised logits, ``s`` calls of ``F.cross_entropy`` (TP=1, for checks).
* ``fused``     -- materialised logits, one pass: vocab-parallel over the TP group when there is
  one of more than one rank, the single-device kernel otherwise.
* ``chunked``   -- LM head fused into the loss, logits never materialised (PyTorch, any device).
* ``triton``    -- the same with Triton kernels (CUDA; on CPU through ``TRITON_INTERPRET=1``).
* ``auto``      -- a recipe-only name: ``resolve_loss_impl`` turns it into one of the above.

Depends on torch only (``triton`` is only tried for import).
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["LOSS_IMPLEMENTATIONS", "LOGITS_IMPLEMENTATIONS", "LINEAR_IMPLEMENTATIONS",
           "triton_available", "resolve_loss_impl"]

log = logging.getLogger(__name__)

LOGITS_IMPLEMENTATIONS = ("reference", "fused")  # on (N, V) logits: multi_hot_cross_entropy
LINEAR_IMPLEMENTATIONS = ("chunked", "triton")  # on hidden states and the LM head: linear_mce
LOSS_IMPLEMENTATIONS = ("auto",) + LOGITS_IMPLEMENTATIONS + LINEAR_IMPLEMENTATIONS


def triton_available(*, interpreter_ok: bool = True) -> bool:
    """Triton importable and something to run it on: CUDA, or (``interpreter_ok``) the CPU
    interpreter (``TRITON_INTERPRET=1``, for tests; far too slow for training)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or (interpreter_ok
                                         and os.environ.get("TRITON_INTERPRET") == "1")


def resolve_loss_impl(requested: str) -> str:
    """``loss.implementation`` resolved for this machine: ``auto`` is triton on CUDA with Triton
    importable, else fused; ``triton`` without them runs the same function as ``chunked`` (so that
    a GPU run's checkpoint still evaluates and exports on a CPU machine), with a warning. Any other
    name comes back unchanged."""
    if requested in ("auto", "triton"):
        ok = triton_available(interpreter_ok=False)
        if requested == "auto":
            return "triton" if ok else "fused"
        if not ok:
            log.warning("loss.implementation=triton needs a CUDA device and Triton; using the "
                        "chunked PyTorch implementation of the same loss")
            return "chunked"
    return requested
