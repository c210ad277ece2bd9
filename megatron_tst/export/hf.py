"""``megatron-tst export CHECKPOINT --to hf OUTDIR``: a checkpoint as a Hugging Face model dir.

The checkpoint may come from any layout (TP/PP/EP shards, virtual pipeline stages): the model is
built in one process with TP=PP=EP=1 from the run config stored in the checkpoint, with the
trainer's own ``build_model_chunks`` (megatron-core's local layer spec), and megatron's dist
checkpointing gathers the weights into it. Then the names and layouts are mapped by
``export/mapping.py`` (the table there; each rule also maps the other way).

Architectures: dense -> ``LlamaForCausalLM``; dense with qk-norm -> ``Qwen3ForCausalLM``; MoE with
qk-norm -> ``Qwen3MoeForCausalLM``; MoE without qk-norm -> ``MixtralForCausalLM``; NoPE layers
(``model.no_rope_freq``) or no RoPE at all -> ``SmolLM3ForCausalLM``. RoPE is the same
rotate-half convention in both (megatron ``rotary_interleaved=False``); megatron's router
(softmax over the top-k logits) equals Qwen3-MoE's with ``norm_topk_prob`` and Mixtral's; with
``model.moe_router_pre_softmax`` (softmax over all experts, top-k not renormalized) it is
Qwen3-MoE's ``norm_topk_prob: false``.

The padded vocabulary rows (megatron pads the embedding and LM head to a multiple of
``make_vocab_size_divisible_by`` x TP) are dropped: ``vocab_size`` is the run's vocabulary, so
logits of real tokens are unchanged and the padding, never a target, is gone
(``--keep-vocab-padding`` keeps them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_tst.config import RunConfig
from megatron_tst.export.errors import ExportError
from megatron_tst.export.mapping import ModelShape, weight_map
from megatron_tst.export.source import (TokenizerLocation, build_models, checkpoint_config,
                                        find_tokenizer, load_model_weights, megatron_state,
                                        vocab_sizes)
from megatron_tst.plan import RunPlan
from megatron_tst.training.saved import SavedCheckpoint, open_checkpoint
from megatron_tst.export.tokenizer import TokenizerIds, check_tokenizer, write_tokenizer

log = logging.getLogger(__name__)

FORMATS = ("hf",)
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SHARD_BYTES = 5 * 1024**3
WEIGHTS_NAME = "model.safetensors"
INFO_NAME = "megatron_tst_export.json"


@dataclass(frozen=True)
class Architecture:
    key: str  # llama | qwen3 | qwen3_moe | mixtral | smollm3
    hf_class: str
    model_type: str


ARCHITECTURES = {
    "llama": Architecture("llama", "LlamaForCausalLM", "llama"),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": Architecture("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3_moe"),
    "mixtral": Architecture("mixtral", "MixtralForCausalLM", "mixtral"),
    "smollm3": Architecture("smollm3", "SmolLM3ForCausalLM", "smollm3"),
}


@dataclass
class ExportResult:
    outdir: Path
    checkpoint: Path
    architecture: str
    vocab_size: int
    padded_vocab_size: int
    dtype: str
    step: int
    phase: str
    warnings: list[str] = field(default_factory=list)
    max_logit_diff: Optional[float] = None  # --check: |HF - megatron| over a batch


# ------------------------------------------------------------------------------ architecture
def choose_architecture(cfg: RunConfig) -> Architecture:
    """The Hugging Face architecture that computes exactly what this model computes; an
    ``ExportError`` naming the key for anything none of them can express."""
    m = cfg.model

    def refuse(key: str, value, why: str) -> ExportError:
        return ExportError(f"{why}; megatron-tst exports RMSNorm + SwiGLU models without biases "
                           f"(Llama, Qwen3, Qwen3-MoE, Mixtral, SmolLM3 architectures)",
                           key=key, value=value)

    if m.normalization != "RMSNorm":
        raise refuse("model.normalization", m.normalization,
                     "LayerNorm models have no Hugging Face counterpart among the supported "
                     "architectures (they all use RMSNorm)")
    if m.activation != "swiglu":
        raise refuse("model.activation", m.activation,
                     "the supported architectures use a SwiGLU MLP (gate, up, down)")
    nope = m.no_rope_freq is not None or m.position_embedding != "rope"
    if m.num_moe_experts:
        if nope:
            key = "model.no_rope_freq" if m.no_rope_freq is not None else "model.position_embedding"
            raise refuse(key, getattr(m, key.split(".")[1]),
                         "an MoE model with NoPE layers has no Hugging Face architecture "
                         "(Qwen3-MoE and Mixtral apply RoPE in every layer)")
        if m.moe_router_pre_softmax and not m.qk_layernorm:
            raise refuse("model.moe_router_pre_softmax", True,
                         "Mixtral renormalizes the top-k probabilities (a softmax over the top-k "
                         "logits); with qk-norm the model exports as Qwen3-MoE, whose "
                         "norm_topk_prob=false is this router")
        return ARCHITECTURES["qwen3_moe" if m.qk_layernorm else "mixtral"]
    if nope:
        if m.qk_layernorm:
            raise refuse("model.qk_layernorm", True,
                         "NoPE layers with qk-norm have no Hugging Face architecture (SmolLM3, "
                         "the one with NoPE layers, has no qk-norm)")
        if not _transformers_has("SmolLM3ForCausalLM"):
            raise ExportError(
                "a model with NoPE layers exports as SmolLM3ForCausalLM, which the installed "
                "transformers does not have (or transformers is not installed): pip install "
                "'transformers>=4.53'", key="model.no_rope_freq", value=m.no_rope_freq)
        return ARCHITECTURES["smollm3"]
    return ARCHITECTURES["qwen3" if m.qk_layernorm else "llama"]


def _transformers_has(name: str) -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return hasattr(transformers, name)


def nope_layers(cfg: RunConfig) -> list[int]:
    """SmolLM3's ``no_rope_layers``: 1 = RoPE in that layer, 0 = none. megatron's
    ``no_rope_freq=n`` leaves RoPE out of layers n, 2n, ... (1-based), as SmolLM3's interval."""
    m = cfg.model
    if m.position_embedding != "rope":
        return [0] * m.num_layers
    n = m.no_rope_freq
    return [int(n is None or (i + 1) % n != 0) for i in range(m.num_layers)]


# ----------------------------------------------------------------------------------- weights
def convert_weights(cfg: RunConfig, arch: Architecture, sd: dict, vocab: int) -> dict:
    """Hugging Face tensors from a TP=PP=EP=1 megatron state dict (``_extra_state`` entries
    dropped) through ``mapping.weight_map``; every megatron weight must be used, or the export is
    refused naming it."""
    sd = {k: v for k, v in sd.items() if not k.endswith("_extra_state")}
    out: dict[str, torch.Tensor] = {}
    for rule in weight_map(ModelShape.of(cfg.model), arch.key, vocab):
        try:
            tensor = sd.pop(rule.megatron)
        except KeyError:
            raise ExportError(f"the model has no weight {rule.megatron!r}, which a "
                              f"{arch.hf_class} export needs; the checkpoint's model does not "
                              f"match its run config") from None
        out.update(zip(rule.hf, rule.to_hf(tensor)))
    if sd:
        key = sorted(sd)[0]
        raise ExportError(
            f"the model has weights that {arch.hf_class} has no place for, e.g. {key!r} "
            f"({len(sd)} in all: {', '.join(sorted(sd)[:6])}); megatron-tst exports models "
            f"without biases, shared experts or expert biases")
    return {k: v.detach().contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------ config
def hf_config(cfg: RunConfig, arch: Architecture, vocab: int, ids: TokenizerIds,
              dtype: str) -> dict:
    """``config.json`` for ``arch``, written out in full (transformers 4.x and 5.x read it)."""
    m = cfg.model
    heads = m.num_attention_heads
    layers = m.num_layers
    c = {
        "architectures": [arch.hf_class],
        "model_type": arch.model_type,
        "vocab_size": vocab,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size or 4 * m.hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": m.num_query_groups or heads,
        "head_dim": m.kv_channels or m.hidden_size // heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_length,
        "initializer_range": m.init_method_std,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(m.rotary_base)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": not m.untie_embeddings,
        "use_cache": True,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if arch.key == "llama":
        c.update(mlp_bias=False, pretraining_tp=1)
    if arch.key in ("qwen3", "qwen3_moe"):
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers)
    if arch.key in ("qwen3_moe", "mixtral"):
        expert_ffn = m.moe_ffn_hidden_size or m.ffn_hidden_size or 4 * m.hidden_size
        c.update(num_experts_per_tok=m.moe_router_topk, output_router_logits=False,
                 router_aux_loss_coef=m.moe_aux_loss_coeff)
        if arch.key == "qwen3_moe":
            c.update(num_experts=m.num_moe_experts, moe_intermediate_size=expert_ffn,
                     norm_topk_prob=not m.moe_router_pre_softmax, decoder_sparse_step=1,
                     mlp_only_layers=[])
        else:
            c.update(num_local_experts=m.num_moe_experts, intermediate_size=expert_ffn,
                     router_jitter_noise=0.0, sliding_window=None)
    if arch.key == "smollm3":
        c.update(no_rope_layers=nope_layers(cfg), no_rope_layer_interval=m.no_rope_freq or 4,
                 use_sliding_window=False, sliding_window=None, mlp_bias=False,
                 layer_types=["full_attention"] * layers)
    return c


# ------------------------------------------------------------------------------------ export
@contextlib.contextmanager
def one_process_model(target: str | Path | SavedCheckpoint):
    """(saved checkpoint, config, model, vocabulary) of checkpoint ``target`` (or one already
    opened) built in this process with TP=PP=EP=1 and its weights loaded: what the export
    converts, and the megatron-core forward that the exported model must reproduce."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ExportError("export runs as one process: run `megatron-tst export ...` without "
                          "torchrun (the checkpoint reshards from any layout on load)")
    saved = target if isinstance(target, SavedCheckpoint) else open_checkpoint(target)
    cfg = export_config(saved)
    vocab, padded = vocab_sizes(saved)
    with megatron_state(cfg):
        plan = RunPlan.build(cfg).with_vocab(vocab, padded=padded)
        models, _ = build_models(plan, half_precision_wrapper=False)
        load_model_weights(saved.path, models)
        yield saved, cfg, models[0], vocab


def export_config(saved: SavedCheckpoint) -> RunConfig:
    """The checkpoint's config for one process, on megatron-core's local layer spec, with the
    plain GPTModel output layer (logits; the weights are the same whatever loss trained them)."""
    cfg = checkpoint_config(saved, parallel={}, micro_batch_size=1,
                            model={"transformer_impl": "local", "moe_grouped_gemm": False})
    if hasattr(cfg, "loss"):
        cfg.loss.implementation = "fused"
    return cfg


def prepare_outdir(outdir: Path, force: bool, source: Path, *, what: str = "export",
                   error: type = ExportError) -> Path:
    """A new temporary directory beside ``outdir``, to be renamed to it once complete; refuses an
    ``outdir`` that is a file, is not empty (unless ``force``), overlaps ``source`` (the
    directory read) or holds the working directory."""
    if outdir.exists() and not outdir.is_dir():
        raise error(f"{outdir} exists and is a file; give a directory to write in")
    if outdir.is_dir() and any(outdir.iterdir()) and not force:
        raise error(f"{outdir} exists and is not empty; give a new directory, or pass --force "
                    f"to replace its contents")
    resolved, read = outdir.resolve(), source.resolve()
    if resolved == read or resolved in read.parents or read in resolved.parents:
        raise error(f"{outdir} overlaps {source}, which the {what} reads; give another directory")
    if resolved == Path.cwd() or resolved in Path.cwd().parents:
        raise error(f"{outdir} is the working directory or holds it; give a directory of its own")
    resolved.parent.mkdir(parents=True, exist_ok=True)
    tmp = resolved.with_name(f".{resolved.name}.{what}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _save_weights(tensors: dict, outdir: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ExportError("writing the weights needs the safetensors package: "
                          "pip install -e '.[hf]'") from None

    shards, current, size = [], {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[key] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(outdir / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(outdir / name), metadata={"format": "pt"})
        for key, t in shard.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
    (outdir / f"{WEIGHTS_NAME}.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """megatron-core's forward: logits [B, S, padded vocab] (TP=1, so the full vocabulary)."""
    tokens = tokens.to(next(model.parameters()).device)
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, attention_mask=None).float().cpu()


def compare_with_transformers(outdir: Path, model, vocab: int, tokens: torch.Tensor) -> float:
    """max |logits| difference between transformers' forward of the export and megatron's."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(outdir), dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(input_ids=tokens).logits.float()
    want = megatron_logits(model, tokens)[..., :got.shape[-1]]
    return float((got - want.to(got.device)).abs().max())


def export_checkpoint(target: str | Path, outdir: str | Path, *, force: bool = False,
                      tokenizer: Optional[str] = None, dtype: Optional[str] = None,
                      keep_vocab_padding: bool = False, check: bool = False) -> ExportResult:
    """Export checkpoint ``target`` (a step directory or a checkpoint root) into ``outdir``."""
    saved = open_checkpoint(target)
    cfg = export_config(saved)
    arch = choose_architecture(cfg)
    dtype = dtype or cfg.model.params_dtype
    if dtype not in DTYPE_NAMES:
        raise ExportError(f"--dtype {dtype}: use one of {', '.join(DTYPE_NAMES)}")
    location = find_tokenizer(saved, tokenizer)
    outdir = Path(outdir)
    tmp = prepare_outdir(outdir, force, saved.path)
    warnings = [w for w in [saved.phase_warning()] if w]
    try:
        ids = write_tokenizer(location, tmp, model_max_length=cfg.model.seq_length)
        saved.check_tokenizer(ids.vocab_size, str(location.path))
        vocab, padded = vocab_sizes(saved, ids.vocab_size)
        if ids.vocab_size > vocab:
            raise ExportError(f"the tokenizer {location.path} has {ids.vocab_size:,} entries but "
                              f"the model was trained with a vocabulary of {vocab:,}: it is not "
                              f"the run's tokenizer; pass the right one with --tokenizer")
        out_vocab = padded if keep_vocab_padding else vocab
        with one_process_model(saved) as (_, _, model, _):
            tensors = convert_weights(cfg, arch, model.state_dict(), out_vocab)
            tensors = {k: v.to("cpu", DTYPE_NAMES[dtype]).contiguous() for k, v in tensors.items()}
            _save_weights(tensors, tmp)
            del tensors
            config = hf_config(cfg, arch, out_vocab, ids, dtype)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            (tmp / "generation_config.json").write_text(json.dumps({
                "bos_token_id": ids.bos, "eos_token_id": ids.eos,
                "pad_token_id": ids.pad if ids.pad is not None else ids.eos}, indent=2) + "\n")
            max_diff = None
            if check:
                max_diff, problems = _check_export(tmp, location, model, out_vocab, cfg)
                warnings += problems
        info = {
            "checkpoint": str(saved.path.resolve()), "step": saved.step, "phase": saved.phase,
            "bag_size": saved.train_state.get("bag_size"),
            "consumed_tokens": saved.train_state.get("consumed_tokens"),
            "saved_layout": saved.saved_layout, "architecture": arch.hf_class,
            "vocab_size": out_vocab, "padded_vocab_size": padded,
            "vocab_padding_rows_dropped": padded - out_vocab, "dtype": dtype,
            "tokenizer": str(Path(location.path).resolve()), "max_abs_logit_diff": max_diff,
            "warnings": warnings,
        }
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)
        if outdir.exists():
            shutil.rmtree(outdir)
        os.replace(tmp, outdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(outdir, saved.path, arch.hf_class, out_vocab, padded, dtype, saved.step,
                        saved.phase, warnings, max_diff)


def _check_export(outdir: Path, location: TokenizerLocation, model, vocab: int,
                  cfg: RunConfig) -> tuple[Optional[float], list[str]]:
    """--check: transformers loads the directory; its logits and its tokenizer are compared."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None, ["--check needs transformers (pip install -e '.[hf]'): not checked"]
    problems = []
    differ = check_tokenizer(outdir, location)
    if differ:
        problems.append(f"the exported tokenizer encodes {len(differ)} sample text(s) "
                        f"differently from the run's tokenizer, e.g. {differ[0][:60]!r}")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, min(cfg.model.seq_length, 64)), generator=gen)
    return compare_with_transformers(outdir, model, vocab, tokens), problems


# --------------------------------------------------------------------------------------- CLI
def run_export(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    result = export_checkpoint(args.checkpoint, args.outdir, force=args.force,
                               tokenizer=args.tokenizer, dtype=args.dtype,
                               keep_vocab_padding=args.keep_vocab_padding, check=args.check)
    for warning in result.warnings:
        print(f"megatron-tst: warning: {warning}", file=sys.stderr)
    print(f"exported {result.checkpoint} (step {result.step}, {result.phase or 'unknown'} phase)"
          f"\n  to          {result.outdir}\n  as          {result.architecture}, {result.dtype}, "
          f"vocabulary {result.vocab_size:,} (padded {result.padded_vocab_size:,} in megatron)")
    if result.max_logit_diff is not None:
        print(f"  check       max |logit difference| vs megatron-core: {result.max_logit_diff:.2e}")
    print(f"  load with   AutoModelForCausalLM.from_pretrained({str(result.outdir)!r})")
    return 0
