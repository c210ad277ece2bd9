"""``megatron-tst inspect``: what a recipe costs before it runs, or what a checkpoint holds.

A recipe report gives parameter counts (total, active, embedding), the layout on a number of
GPUs, model FLOPs per step (equal in both TST phases), data tokens and model positions per step
in each phase and over the run, and the memory estimate of the most loaded GPU
(``models/sizing.py``). Nothing is built and no process group is created.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.models.sizing import GiB, flops_per_step, memory_estimate, parameter_counts
from megatron_tst.plan import RunPlan


def default_gpus(cfg: RunConfig) -> tuple[int, str]:
    """(processes, why) when ``--gpus`` is not given: a CPU recipe (the demo corpus, or gloo) on
    the fewest processes its model-parallel sizes need; any other on one node of 8 GPUs."""
    p = cfg.parallel
    if cfg.data.source == "demo" or p.backend == "gloo":
        n = p.tensor_model_parallel_size * p.pipeline_model_parallel_size \
            * p.expert_model_parallel_size
        return n, f"--gpus {n}, the default for a CPU recipe: its TP x PP x EP"
    return 8, "--gpus 8, the default: one node"


def recipe_report(cfg: RunConfig, gpus: Optional[int] = None) -> dict:
    """Figures for ``cfg`` on ``gpus`` GPUs (None: ``default_gpus``); a ConfigError if the layout
    does not fit, naming the GPU count."""
    from megatron_tst.data.build import run_tokenizer_vocab

    m, p, t = cfg.model, cfg.parallel, cfg.training
    gpus, why = (gpus, f"--gpus {gpus}") if gpus is not None else default_gpus(cfg)
    try:
        vocab_size = m.vocab_size or run_tokenizer_vocab(cfg)[0]
    except ConfigError as err:
        raise ConfigError(f"inspect needs the vocabulary size: set model.vocab_size (the "
                          f"tokenizer's) in the recipe or as an override, or make "
                          f"data.tokenizer.path readable ({err.message})",
                          key="model.vocab_size", value=None) from None
    try:
        plan = RunPlan.build(cfg, gpus, vocab_size=vocab_size)
    except ConfigError as err:
        raise ConfigError(f"{err.message} (on {why}; give --gpus N for another count)",
                          key=err.key, value=err.value) from None
    sched, stream, lay, vocab = plan.schedule, plan.stream, plan.layout, plan.padded_vocab_size
    counts = parameter_counts(cfg, vocab)
    positions = t.global_batch_size * m.seq_length
    flops = flops_per_step(cfg, vocab)
    mem = memory_estimate(cfg, vocab, gpus)
    phases = []
    if sched.is_tst:
        phase = sched.phase(0)
        phases.append({"phase": phase.name, "bag_size": phase.bag_size,
                       "steps": [1, sched.superposition_steps],
                       "data_tokens_per_step": stream.step_tokens(phase),
                       "positions_per_step": positions})
    if sched.superposition_steps < t.train_steps:
        phase = sched.phase(t.train_steps - 1)
        phases.append({"phase": phase.name, "bag_size": phase.bag_size,
                       "steps": [sched.superposition_steps + 1, t.train_steps],
                       "data_tokens_per_step": stream.step_tokens(phase),
                       "positions_per_step": positions})
    return {
        "name": cfg.name,
        "model": {"layers": m.num_layers, "hidden": m.hidden_size,
                  "heads": m.num_attention_heads,
                  "kv_groups": m.num_query_groups or m.num_attention_heads,
                  "ffn": m.moe_ffn_hidden_size if m.num_moe_experts else m.ffn_hidden_size,
                  "experts": m.num_moe_experts, "topk": m.moe_router_topk if m.num_moe_experts
                  else None, "seq_length": m.seq_length, "vocab": plan.vocab_size,
                  "padded_vocab": vocab},
        "parameters": {"total": counts.total, "active": counts.active,
                       "embedding": counts.embedding, "output": counts.output,
                       "non_embedding": counts.non_embedding,
                       "active_non_embedding": counts.active - counts.embedding - counts.output},
        "layout": {"gpus": gpus, "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep,
                   "sequence_parallel": p.sequence_parallel,
                   "distributed_optimizer": p.use_distributed_optimizer,
                   "micro_batch_size": lay.micro_batch_size,
                   "microbatches_per_step": lay.num_microbatches},
        "flops_per_step": flops, "flops_per_step_per_gpu": flops / gpus,
        "run_flops": flops * t.train_steps,
        "phases": phases,
        "run_data_tokens": sched.data_tokens(t.train_steps, t.global_batch_size, m.seq_length),
        "run_positions": positions * t.train_steps,
        "memory_per_gpu_bytes": {"params_on_gpu": mem.params_on_gpu, "weights": mem.weights,
                                 "gradients": mem.gradients, "optimizer": mem.optimizer,
                                 "activations": mem.activations, "logits": mem.logits,
                                 "total": mem.total},
    }


def _n(x: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:g}"


def format_recipe_report(r: dict, source: str) -> str:
    m, pc, lay, mem = r["model"], r["parameters"], r["layout"], r["memory_per_gpu_bytes"]
    heads = f"{m['heads']} heads ({m['kv_groups']} KV groups)"
    mlp = (f"{m['experts']} experts of FFN {m['ffn']}, top-{m['topk']}" if m["experts"]
           else f"FFN {m['ffn']}")
    lines = [
        f"recipe           {source} ({r['name']})",
        f"model            {m['layers']} layers, hidden {m['hidden']}, {heads}, {mlp}, "
        f"sequence {m['seq_length']}, vocab {m['vocab']:,} (padded {m['padded_vocab']:,})",
        f"parameters       {pc['total']:,} ({_n(pc['total'])}): embedding {_n(pc['embedding'])}"
        f", LM head {_n(pc['output'])}, non-embedding {_n(pc['non_embedding'])}",
        f"active/token     {pc['active']:,} ({_n(pc['active'])}; "
        f"{_n(pc['active_non_embedding'])} without embedding and LM head)",
        f"layout           {lay['gpus']} GPUs = TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}"
        f" (EP {lay['ep']}{', SP' if lay['sequence_parallel'] else ''}"
        f"{', distributed optimizer' if lay['distributed_optimizer'] else ''}), micro-batch "
        f"{lay['micro_batch_size']}, {lay['microbatches_per_step']} micro-batches per step",
        f"FLOPs per step   {r['flops_per_step']:.3e} (equal in both phases), "
        f"{r['flops_per_step_per_gpu']:.3e} per GPU; run {r['run_flops']:.3e}",
    ]
    for ph in r["phases"]:
        s = f"s={ph['bag_size']}, " if ph["phase"] == "superposition" else ""
        lines.append(f"{ph['phase']:<17}{s}steps {ph['steps'][0]}-{ph['steps'][1]}: "
                     f"{ph['data_tokens_per_step']:,} data tokens and "
                     f"{ph['positions_per_step']:,} positions per step")
    lines.append(f"run tokens       {_n(r['run_data_tokens'])} data tokens, "
                 f"{_n(r['run_positions'])} positions")
    lines.append(
        f"memory per GPU   ~{mem['total'] / GiB:.1f} GiB (estimate, most loaded GPU): weights "
        f"{mem['weights'] / GiB:.1f}, gradients {mem['gradients'] / GiB:.1f}, optimizer "
        f"{mem['optimizer'] / GiB:.1f}, activations {mem['activations'] / GiB:.1f}, logits "
        f"{mem['logits'] / GiB:.1f} ({_n(mem['params_on_gpu'])} parameters on the GPU)")
    return "\n".join(lines)


def checkpoint_report(path: Path) -> dict:
    from megatron_tst.training.saved import open_checkpoint

    saved = open_checkpoint(path)
    return {"path": str(saved.path), "train_state": saved.train_state,
            "scheduler": saved.scheduler, "run_config": saved.run_config}


def run_inspect(args) -> int:
    from megatron_tst.config import load_config

    path = Path(args.target)
    if path.suffix in (".yaml", ".yml"):
        report = recipe_report(load_config(str(path), args.overrides), args.gpus)
        print(json.dumps(report, indent=2) if args.json else format_recipe_report(report, str(path)))
        return 0
    if args.overrides:
        raise ConfigError("overrides apply to a recipe, not to a checkpoint: "
                          f"drop {' '.join(args.overrides)}")
    print(json.dumps(checkpoint_report(path), indent=2, default=str))
    return 0


def add_inspect_arguments(p) -> None:
    p.add_argument("target", help="a recipe (.yaml), a checkpoint step_* directory or a "
                                  "checkpoint root")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. training.micro_batch_size=2")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs for the layout and memory figures (default: 8, one node; for a "
                        "CPU recipe, the processes its TP x PP x EP need)")
    p.add_argument("--json", action="store_true", help="print the recipe report as JSON")
