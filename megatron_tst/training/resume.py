"""What may change between the run that wrote a checkpoint and the run that resumes from it.

Three kinds of keys (dotted, as in recipes):

- **fixed**: the model's shape and meaning, the vocabulary, the sequence length and the TST bag
  size (the data stream is cut in ``s x L``-token chunks: changing either would move the data
  position). A resume that changes one is refused; start a new run instead.
- **explicit**: changes that are sound but change the run's meaning: the LR schedule and its
  length, the optimizer's hyper-parameters, the phase boundary, the data blend, the tokenizer
  file, the loss weighting. Each must be named in ``checkpoint.allow_changes`` (a key or a
  section such as ``schedule``); then the new values apply from the resumed step (the LR
  scheduler is rebuilt from the recipe instead of restored).
- everything else (layout, batch split into micro-batches, logging, checkpoint cadence, eval,
  names, seed): free, as the checkpoint reshards and the data position is counted in tokens.

``check_resume`` lists every difference at once, each with its fix, in one ``ConfigError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.plan import RunPlan
from megatron_tst.training.saved import SavedCheckpoint

FIXED = {
    "model.num_layers", "model.hidden_size", "model.num_attention_heads",
    "model.num_query_groups", "model.kv_channels", "model.ffn_hidden_size", "model.seq_length",
    "model.make_vocab_size_divisible_by", "model.normalization", "model.activation",
    "model.position_embedding", "model.rotary_base", "model.no_rope_freq", "model.qk_layernorm",
    "model.untie_embeddings", "model.num_moe_experts", "model.moe_router_topk",
    "model.moe_ffn_hidden_size", "model.moe_shared_expert_intermediate_size",
    "model.moe_router_enable_expert_bias", "tst.bag_size", "vocab_size",
}
EXPLICIT = ("training.train_steps", "training.global_batch_size", "optimizer", "schedule",
            "tst.ratio", "tst.superposition_steps", "tst.weighting", "tst.power",
            "tst.slot_weights", "tst.respect_documents", "data.source", "data.train_paths",
            "data.train_weights", "data.tokenizer", "data.demo_vocab_size", "model.params_dtype",
            "model.moe_aux_loss_coeff", "model.moe_router_load_balancing_type",
            "model.moe_router_score_function", "model.moe_router_pre_softmax",
            "model.moe_router_topk_scaling_factor", "model.moe_z_loss_coeff", "model.fp8",
            "model.fp8_recipe", "model.fp8_param", "megatron.transformer", "megatron.optimizer")
# Changes that the resumed LR scheduler must take from the recipe rather than the checkpoint.
SCHEDULE = ("training.train_steps", "optimizer", "schedule")

WHY_FIXED = {
    "tst.bag_size": "the data stream is read in chunks of tst.bag_size x model.seq_length "
                    "tokens, so the data position cannot be carried over; to end the "
                    "superposition phase earlier or later change tst.superposition_steps or "
                    "tst.ratio (with checkpoint.allow_changes) and keep tst.bag_size",
    "model.seq_length": "the data position is counted in chunks of model.seq_length tokens and "
                        "the model was trained at this length",
    "vocab_size": "the embedding and LM head have one row per vocabulary entry",
}


@dataclass(frozen=True)
class Change:
    key: str
    saved: Any
    now: Any


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def differences(saved_config: dict, cfg: RunConfig, saved_vocab: int, vocab: int) -> list[Change]:
    """Fixed and explicit keys whose value differs (keys one side lacks are skipped)."""
    saved, now = _flatten(saved_config), _flatten(cfg.to_dict())
    changes = [Change(k, saved[k], now[k]) for k in now
               if k in saved and saved[k] != now[k] and (k in FIXED or _matches(k, EXPLICIT))]
    if saved_vocab and saved_vocab != vocab:
        changes.append(Change("vocab_size", saved_vocab, vocab))
    return changes


def check_resume(saved: SavedCheckpoint, plan: RunPlan) -> list[Change]:
    """Raise one ConfigError listing every refused change (recipe keys, and a data position this
    run's stream cannot continue from); return the allowed explicit changes."""
    cfg, state = plan.cfg, saved.train_state
    allowed = cfg.checkpoint.allow_changes
    problems, accepted = [], []
    for c in differences(saved.run_config, cfg, state.get("vocab_size", 0), plan.vocab_size):
        what = f"{c.key}: {c.saved!r} -> {c.now!r}"
        if c.key in FIXED:
            problems.append(f"{what} cannot change on resume: "
                            f"{WHY_FIXED.get(c.key, 'it changes the model the weights belong to')}")
        elif not _matches(c.key, allowed):
            problems.append(f"{what} changes the run: allow it with "
                            f"checkpoint.allow_changes=[{c.key}]")
        else:
            accepted.append(c)
    position = plan.stream.resume_problem(
        step=saved.step, phase=saved.phase, consumed_tokens=int(state.get("consumed_tokens", 0)),
        data_chunk=int(state.get("data_chunk", 1)))
    if position:
        problems.append(position)
    if problems:
        path = saved.path
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(
            f"cannot resume from {path} with this recipe; {len(problems)} difference(s) from the "
            f"run that wrote it:\n{listing}\nCompare with {path}/run_config.yaml; start a new run "
            f"instead with checkpoint.load=none or another run_dir",
            key="checkpoint.load", value=str(path))
    return accepted


def changes_schedule(accepted: list[Change]) -> bool:
    return any(_matches(c.key, SCHEDULE) for c in accepted)
