"""Activation recomputation changes memory, never the numbers: one process of the check.

    python tests/training/_recompute_worker.py OUT_DIR RECIPE MODE=OVERRIDES... -- OVERRIDES...

(under torchrun for several processes). Each ``MODE=k1=v1;k2=v2`` is one run of the real
``Trainer`` in this process group (the first mode is the reference, normally no recomputation);
the overrides after ``--`` apply to every run. Before every optimizer step the worker copies this
rank's reduced gradients (the DDP ``main_grad`` buffers), so gradients are compared at every
step, in both TST phases and across the switch. Writes ``OUT_DIR/rank<r>.json``:
``{mode: {"loss": [per step], "loss_rel": [...], "grad_rel": [...], "calls": {...}}}`` with the
relative
differences to the reference (``|x - x0| / |x0|``; gradients: the norm over all of this rank's
parameters) and the forward calls of the core attention and MLP modules (recomputed modules run
twice), which show that the recomputation really happened.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run(recipe: str, overrides: list[str], world_size: int):
    from megatron_tst.config import load_config
    from megatron_tst.plan import RunPlan
    from megatron_tst.training.trainer import Trainer

    cfg = load_config(recipe, overrides, world_size=world_size)
    trainer = Trainer(cfg, RunPlan.build(cfg, world_size))
    grads, losses = [], []
    real_step = trainer.optimizer.step

    def step_recording_gradients():
        grads.append(torch.cat([p.main_grad.detach().flatten().double().clone()
                                for chunk in trainer.model for p in chunk.parameters()]))
        return real_step()

    trainer.optimizer.step = step_recording_gradients
    real_train_step = trainer.train_step

    def train_step_recording_loss(phase, batches):
        metrics = real_train_step(phase, batches)
        losses.append(metrics["loss"])
        return metrics

    trainer.train_step = train_step_recording_loss
    calls = {"core_attn": 0, "mlp": 0}  # forward calls: recomputation repeats them in backward
    for chunk in trainer.model:
        for name, module in chunk.named_modules():
            kind = ("core_attn" if name.endswith("self_attention.core_attention") else
                    "mlp" if name.endswith(".mlp") else None)
            if kind:
                module.register_forward_hook(lambda *_, kind=kind: calls.__setitem__(
                    kind, calls[kind] + 1))
    trainer.fit()
    return losses, grads, calls


def main() -> None:
    out_dir, recipe, *rest = sys.argv[1:]
    split = rest.index("--")
    modes = [m.split("=", 1) for m in rest[:split]]
    common = rest[split + 1:]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    results, ref = {}, None
    for name, mode in modes:
        extra = [o for o in mode.split(";") if o]
        losses, grads, calls = run(recipe, [*common, f"run_dir={out_dir}/{name}", *extra], world)
        if ref is None:
            ref = losses, grads
        results[name] = {
            "overrides": extra,
            "loss": losses,
            "loss_rel": [None if a is None else abs(a - b) / abs(b)
                         for a, b in zip(losses, ref[0])],
            "grad_rel": [float((g - g0).norm() / g0.norm()) for g, g0 in zip(grads, ref[1])],
            "steps": len(grads),
            "calls": calls,
        }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    from megatron_tst.training.distributed import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
