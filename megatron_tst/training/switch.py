"""What happens at the superposition -> recovery switch, beyond changing the data and the loss.

By default nothing: the paper keeps the embedding and LM head and carries the optimizer state over
(resetting either hurt). The two ablations are available: ``tst.reset_optimizer_at_switch`` drops
the Adam moments and step counts; ``tst.reinit_embeddings_at_switch`` draws the input embedding and
the LM head afresh (normal, ``model.init_method_std``), the same on every data-parallel replica.
"""

from __future__ import annotations

import logging

import torch

from megatron_tst.config import RunConfig
from megatron_tst.training.optim import TrainingOptimizer

log = logging.getLogger("megatron_tst")


def apply_switch(cfg: RunConfig, model_chunks: list, optimizer: TrainingOptimizer) -> None:
    if cfg.tst.reinit_embeddings_at_switch:
        reinit_embeddings(cfg, model_chunks)
        optimizer.reload_model_params()
        log.info("switch: re-initialised the input embedding and LM head")
    if cfg.tst.reset_optimizer_at_switch:
        optimizer.reset_state()
        log.info("switch: reset the optimizer state")


def reinit_embeddings(cfg: RunConfig, model_chunks: list) -> None:
    from megatron.core import parallel_state

    gen = torch.Generator().manual_seed(
        cfg.seed + 7919 + 1000 * parallel_state.get_tensor_model_parallel_rank())
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if name.endswith(("embedding.word_embeddings.weight", "output_layer.weight")):
                fresh = torch.randn(param.shape, generator=gen) * cfg.model.init_method_std
                with torch.no_grad():
                    param.copy_(fresh.to(param.device, param.dtype))
