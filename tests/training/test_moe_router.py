"""The MoE router options the 10B-A1B run needs train through both TST phases: aux-loss-free
balancing (sigmoid scores with a per-expert bias updated from token counts), the router in fp32,
z-loss, a shared expert; the expert bias is saved with the checkpoint."""

import math

import torch

from tests.conftest import read_metrics, run_cli

ROUTER = ["model.num_moe_experts=4", "model.moe_router_topk=2", "model.moe_ffn_hidden_size=64",
          "model.moe_router_score_function=sigmoid", "model.moe_router_enable_expert_bias=true",
          "model.moe_router_bias_update_rate=0.01", "model.moe_router_load_balancing_type=none",
          "model.moe_router_dtype=fp32", "model.moe_z_loss_coeff=0.001",
          "model.moe_shared_expert_intermediate_size=64",
          "tst.bag_size=4", "tst.superposition_steps=3", "training.train_steps=6",
          "training.eval_interval=0"]


def test_aux_loss_free_router_with_shared_expert_trains_through_both_phases(tiny_recipe):
    run_dir = tiny_recipe.parent / "run"
    run_cli(["train", str(tiny_recipe), *ROUTER])
    steps = read_metrics(run_dir)
    assert [r["phase"] for r in steps] == ["superposition"] * 3 + ["recovery"] * 3
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in steps)
    assert steps[-1]["loss"] < steps[3]["loss"]  # recovery learns
    assert all(r["moe_z_loss"] > 0 for r in steps)  # z-loss on, no load-balancing loss
    assert not any("moe_load_balancing_loss" in r for r in steps)

    # The expert bias moved away from zero and is in the checkpoint, so a resume keeps it.
    import torch.distributed.checkpoint as dcp

    step_dir = next((run_dir / "checkpoints").glob("step_*"))
    meta = dcp.FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    key = "decoder.layers.mlp.router.expert_bias"  # megatron stacks the layers' biases
    assert list(meta[key].size) == [2, 4], meta[key]
    state = {key: torch.zeros(2, 4)}
    dcp.load(state, checkpoint_id=str(step_dir), no_dist=True)
    assert (state[key] != 0).sum() >= 4, state[key]  # updated: multiples of the 0.01 rate
