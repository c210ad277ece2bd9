"""A torch norm for megatron's local layer spec under sequence parallelism.

megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel``; transformer-engine's norms (GPU)
support it. With sequence parallelism every TP rank normalises a different slice of the
sequence, so the norm's weight gradients are partial sums: megatron's ``finalize_model_grads``
all-reduces them over TP for parameters that carry ``sequence_parallel = True``, which this
factory sets.
"""

from __future__ import annotations

import torch


class SequenceParallelTorchNorm:
    """Factory with megatron's norm signature: ``(config, hidden_size, eps)`` -> torch norm."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
