"""MoE router statistics for the logs: megatron's per-layer auxiliary-loss tracker, reduced.

megatron's routers add each layer's load-balancing (and z-) loss to a global tracker during the
forward pass. ``moe_metrics`` reduces it the way megatron's ``reduce_aux_losses_tracker_across_ranks``
does (sum over pipeline stages and the tracker's reduce group, mean over data-parallel ranks),
with SUM-then-divide instead of ``ReduceOp.AVG`` so that it works on gloo too, averages over
micro-batches and layers, and clears the tracker for the next step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _mean_over(values: torch.Tensor, group) -> None:
    dist.all_reduce(values, group=group)
    values /= dist.get_world_size(group)


def moe_metrics(num_microbatches: int) -> dict[str, float]:
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import (clear_aux_losses_tracker,
                                                          get_moe_layer_wise_logging_tracker)

    tracker = get_moe_layer_wise_logging_tracker()
    out = {}
    for name in sorted(tracker):
        entry = tracker[name]
        values = entry["values"].detach().float().clone()
        dist.all_reduce(values, group=parallel_state.get_pipeline_model_parallel_group())
        if entry.get("reduce_group") is not None:
            dist.all_reduce(values, group=entry["reduce_group"])
            if not entry.get("reduce_group_has_dp", False):
                _mean_over(values, parallel_state.get_data_parallel_group())
        if entry.get("avg_group") is not None:
            _mean_over(values, entry["avg_group"])
        layers = values[values != 0]
        out[f"moe_{name}"] = (layers.mean() / num_microbatches).item() if len(layers) else 0.0
    clear_aux_losses_tracker()
    return out
