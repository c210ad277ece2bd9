"""``megatron-tst import HF_DIR --out DIR``: a Hugging Face model directory as a megatron-tst
checkpoint, and ``checkpoint.init_from`` (``export/init_from.py``) built on it.

The architectures are the ones export writes (Llama, Qwen3, Qwen3-MoE, Mixtral, SmolLM3 with its
NoPE layers), through the same table (``export/mapping.py``, each rule used backwards), so an
export of an import is the original safetensors bit for bit. The steps:

1. ``read_hf_dir``: ``config.json`` (read by transformers, with its defaults), the safetensors
   files (``pytorch_model.bin`` pickles are refused: loading them runs code) and the tokenizer;
2. ``implied_model``: the recipe ``model`` keys the config implies; what megatron-tst cannot
   express (biases, sliding windows, RoPE scaling, ...) is refused, every reason at once;
3. ``check_recipe``: with a recipe, its model keys, its vocabulary and its tokenizer are checked
   against the config and the model's tokenizer (one error listing every mismatch);
4. ``write_checkpoint``: the model is built in one process (TP=PP=EP=1, megatron-core's local
   layer spec, whose checkpoint keys are the TE spec's), filled through the mapping (the
   vocabulary zero-padded by megatron's rule: the recipe's TP when given) and saved through
   ``dist_checkpointing`` as step 0 with the completion record, so that any layout loads it.
   The tokenizer files are copied into ``DIR/tokenizer``.
"""

from __future__ import annotations

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
from megatron_tst.export.hf import (ARCHITECTURES, DTYPE_NAMES, Architecture, nope_layers,
                                    prepare_outdir)
from megatron_tst.export.mapping import ModelShape, weight_map

log = logging.getLogger(__name__)

IMPORT_INFO = "import.json"  # in the output root: where the weights came from
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
#: Keys a saved model may hold that are not weights (older transformers saved RoPE tables).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
#: Model keys whose values change the function the weights compute (what a recipe must match).
CHECKED_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "ffn_hidden_size", "normalization", "norm_epsilon", "activation",
                "position_embedding", "rotary_base", "no_rope_freq", "qk_layernorm",
                "untie_embeddings", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
                "moe_router_pre_softmax", "moe_router_score_function",
                "moe_shared_expert_intermediate_size")


class ImportError_(ExportError):
    """A Hugging Face directory that cannot be imported as asked."""

    kind = "import error"


@dataclass
class HFModel:
    path: Path
    config: object  # transformers.PretrainedConfig
    arch: Architecture
    weights: dict[str, Path]  # tensor name -> safetensors file
    tokenizer: tuple[str, Path]  # (sentencepiece | huggingface, file)
    dtype: str

    def tensors(self):
        """A reader of the weights: ``with hf.tensors() as get: get(name)``."""
        return _Tensors(self.weights)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    def fingerprint(self) -> dict:
        """{file: [size, mtime]} of what an import reads (an earlier import is reused while
        these are unchanged)."""
        files = sorted({*self.weights.values(), self.path / "config.json", self.tokenizer[1]})
        return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


class _Tensors:
    def __init__(self, weights: dict[str, Path]):
        self.weights, self.files = weights, {}

    def __enter__(self):
        return self.get

    def __exit__(self, *exc):
        self.files.clear()

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.weights[name]
        if path not in self.files:
            self.files[path] = safe_open(str(path), "pt")
        return self.files[path].get_tensor(name)


# ------------------------------------------------------------------------------- reading
def read_hf_dir(path: str | Path, key: Optional[str] = None) -> HFModel:
    """The model in ``path``: config, weight files, tokenizer; an ``ImportError_`` naming the
    file and the fix for anything missing or unreadable."""
    path = Path(path)

    def fail(message: str) -> ImportError_:
        return ImportError_(message, key=key, value=str(path) if key else None)

    if not path.is_dir():
        raise fail(f"{path} is not a directory; give a Hugging Face model directory (config.json, "
                   f"*.safetensors, tokenizer files), e.g. one saved by save_pretrained")
    if not (path / "config.json").is_file():
        raise fail(f"{path} has no config.json: it is not a Hugging Face model directory")
    try:
        text = (path / "config.json").read_text()
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise fail(f"{path / 'config.json'} is unreadable ({err}); restore it from the model's "
                   f"release") from None
    model_type = raw.get("model_type")
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise fail(f"{path / 'config.json'} has model_type {model_type!r}; megatron-tst imports "
                   f"{', '.join(ARCHITECTURES)} models")
    try:
        import transformers
    except ImportError:
        raise fail("importing a Hugging Face model needs transformers and safetensors: "
                   "pip install -e '.[hf]'") from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
    except Exception as err:  # transformers raises several kinds for a bad config
        raise fail(f"transformers cannot read {path / 'config.json'} ({type(err).__name__}: "
                   f"{str(err)[:300]})") from None
    weights = _weight_files(path, fail)
    dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "float32").replace("torch.", "")
    return HFModel(path, config, arch, weights, _tokenizer_file(path, fail),
                   dtype if dtype in DTYPE_NAMES else "float32")


def _weight_files(path: Path, fail) -> dict[str, Path]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise ValueError("weight_map is not an object")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            raise fail(f"{index} is unreadable ({err}); restore it from the model's "
                       f"release") from None
        files = sorted({path / str(f) for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        raise fail(f"{path} has no *.safetensors weights"
                   + (f" (only {', '.join(pickles[:3])}: pickles, which megatron-tst does not "
                      f"load because loading them runs code; convert them with transformers: "
                      f"from_pretrained(...).save_pretrained(DIR, safe_serialization=True))"
                      if pickles else ""))
    weights: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(str(f), "pt") as handle:
                for name in handle.keys():
                    weights[name] = f
        except Exception as err:  # missing or damaged file
            raise fail(f"cannot read the weights file {f} ({type(err).__name__}: "
                       f"{str(err)[:200]}); download it again") from None
    return weights


def _tokenizer_file(path: Path, fail) -> tuple[str, Path]:
    if (path / "tokenizer.json").is_file():
        return "huggingface", path / "tokenizer.json"
    if (path / "tokenizer.model").is_file():
        return "sentencepiece", path / "tokenizer.model"
    raise fail(f"{path} has no tokenizer (tokenizer.json or tokenizer.model): the model's "
               f"tokenizer files belong beside its weights, as save_pretrained writes them")


# ------------------------------------------------------------------------ config -> recipe
def implied_model(hf: HFModel) -> dict:
    """The recipe ``model`` keys ``hf``'s config implies (and ``vocab_size``), or an
    ``ImportError_`` listing everything in it megatron-tst cannot express."""
    c, arch = hf.config, hf.arch.key
    refused: list[str] = []

    def get(name, default=None):
        return getattr(c, name, default)

    def refuse(name, value, why):
        refused.append(f"{name}={value!r} ({why})")

    heads = int(c.num_attention_heads)
    rope = dict(get("rope_parameters") or {})
    theta = rope.get("rope_theta", get("rope_theta"))
    rope_type = rope.get("rope_type") or (get("rope_scaling") or {}).get(
        "rope_type", (get("rope_scaling") or {}).get("type", "default"))
    m = {
        "num_layers": int(c.num_hidden_layers),
        "hidden_size": int(c.hidden_size),
        "num_attention_heads": heads,
        "num_query_groups": int(get("num_key_value_heads") or heads),
        "kv_channels": int(get("head_dim") or c.hidden_size // heads),
        "ffn_hidden_size": int(c.intermediate_size),
        "normalization": "RMSNorm", "activation": "swiglu", "position_embedding": "rope",
        "norm_epsilon": float(c.rms_norm_eps),
        "rotary_base": int(theta) if theta is not None and float(theta).is_integer() else theta,
        "no_rope_freq": None,
        "qk_layernorm": arch in ("qwen3", "qwen3_moe"),
        "untie_embeddings": not bool(get("tie_word_embeddings", False)),
        "num_moe_experts": None, "moe_router_topk": 2, "moe_ffn_hidden_size": None,
        "moe_router_pre_softmax": False, "moe_router_score_function": "softmax",
        "moe_shared_expert_intermediate_size": None,
        "vocab_size": int(c.vocab_size),
        "seq_length": int(get("max_position_embeddings") or 2048),
    }
    if get("hidden_act", "silu") != "silu":
        refuse("hidden_act", get("hidden_act"), "megatron-tst's SwiGLU uses SiLU")
    if not isinstance(m["rotary_base"], int):
        refuse("rope_theta", theta, "model.rotary_base is an integer")
    if rope_type not in (None, "default"):
        refuse("rope_scaling", rope_type, "RoPE scaling is not supported; megatron-tst's RoPE "
                                          "is the default one")
    for name in ("attention_bias", "mlp_bias"):
        if get(name):
            refuse(name, True, "megatron-tst's models have no biases")
    if get("use_sliding_window") or (arch == "mixtral" and get("sliding_window")):
        refuse("sliding_window", get("sliding_window"), "sliding-window attention is not "
                                                        "supported")
    if arch == "smollm3":
        layers = list(get("no_rope_layers") or [1] * m["num_layers"])
        matches = [n for n in [None, *range(1, m["num_layers"] + 1)]
                   if nope_layers(_Shape(m["num_layers"], n)) == layers]
        if not any(layers):
            m["position_embedding"] = "none"
        elif matches:
            m["no_rope_freq"] = matches[0]
        else:
            refuse("no_rope_layers", layers, "megatron's model.no_rope_freq=n leaves RoPE out of "
                                             "every n-th layer only")
    if arch in ("qwen3_moe", "mixtral"):
        m["num_moe_experts"] = int(get("num_experts") if arch == "qwen3_moe"
                                   else get("num_local_experts"))
        m["moe_router_topk"] = int(c.num_experts_per_tok)
        m["moe_ffn_hidden_size"] = int(get("moe_intermediate_size") if arch == "qwen3_moe"
                                       else c.intermediate_size)
        if arch == "qwen3_moe":
            # norm_topk_prob=False: softmax over all experts, top-k not renormalized
            m["moe_router_pre_softmax"] = not bool(get("norm_topk_prob", True))
            if int(get("decoder_sparse_step", 1)) != 1 or list(get("mlp_only_layers") or []):
                refuse("decoder_sparse_step/mlp_only_layers",
                       (get("decoder_sparse_step"), get("mlp_only_layers")),
                       "dense layers between MoE layers are not supported")
    if refused:
        raise ImportError_(f"{hf.path / 'config.json'} describes a model megatron-tst cannot "
                           f"express: {'; '.join(refused)}")
    return m


@dataclass
class _Shape:  # what nope_layers reads of a config
    num_layers: int
    no_rope_freq: Optional[int]
    position_embedding: str = "rope"

    @property
    def model(self):
        return self


def resolved_model_keys(model) -> dict:
    """A recipe's model keys with its defaults resolved (as ``implied_model`` gives them)."""
    values = {k: getattr(model, k) for k in CHECKED_KEYS}
    values["num_query_groups"] = model.num_query_groups or model.num_attention_heads
    values["kv_channels"] = model.kv_channels or model.hidden_size // model.num_attention_heads
    values["ffn_hidden_size"] = model.ffn_hidden_size or 4 * model.hidden_size
    if model.num_moe_experts:
        values["moe_ffn_hidden_size"] = model.moe_ffn_hidden_size or values["ffn_hidden_size"]
    else:
        for k in ("moe_router_topk", "moe_router_pre_softmax", "moe_ffn_hidden_size"):
            values[k] = None
    return values


def model_mismatches(expected: dict, model, vocab: int, source: str) -> list[str]:
    """Every checked model key (and the vocabulary) where recipe ``model`` (vocabulary ``vocab``)
    differs from ``expected`` (``implied_model``, or a checkpoint's model section)."""
    want, have = dict(expected), resolved_model_keys(model)
    if want.get("num_moe_experts"):
        have.pop("ffn_hidden_size")  # only the experts' size is a weight shape then
        want.pop("ffn_hidden_size", None)
    else:
        for k in ("moe_router_topk", "moe_router_pre_softmax", "moe_ffn_hidden_size"):
            want[k] = None
    out = [f"model.{k}: the recipe has {have[k]!r}, {source} has {want[k]!r}"
           for k in CHECKED_KEYS if k in have and k in want and have[k] != want[k]]
    if "vocab_size" in want and vocab != want["vocab_size"]:
        out.append(f"model.vocab_size: the recipe's vocabulary is {vocab:,} rows (model.vocab_size "
                   f"or its tokenizer's size), {source} has {want['vocab_size']:,}: set "
                   f"model.vocab_size: {want['vocab_size']}")
    return out


def check_tokenizers(hf: HFModel, kind: str, path: str | Path) -> Optional[str]:
    """Why the recipe's tokenizer (``kind``, ``path``) is not the model's, or None."""
    from megatron_tst.data.tokenizer_files import open_tokenizer
    from megatron_tst.export.tokenizer import CHECK_TEXTS

    def encoder(kind, path):
        tok = open_tokenizer(kind, path)
        if tok.kind == "sentencepiece":
            return tok.vocab_size, lambda t: list(tok.backend.EncodeAsIds(t))
        return tok.vocab_size, lambda t: tok.backend.encode(t, add_special_tokens=False).ids

    try:
        size, theirs = encoder(*hf.tokenizer)
        mine_size, mine = encoder(kind, path)
    except (ValueError, OSError, ImportError) as err:
        return f"the tokenizers cannot be compared ({err})"
    if size != mine_size:
        return (f"the recipe's tokenizer {path} has {mine_size:,} entries, the model's "
                f"{hf.tokenizer[1]} has {size:,}")
    for text in CHECK_TEXTS:
        if theirs(text) != mine(text):
            return (f"the recipe's tokenizer {path} encodes {text[:40]!r} differently from the "
                    f"model's {hf.tokenizer[1]}")
    return None


def check_recipe(hf: HFModel, cfg: RunConfig, vocab: int, key: Optional[str] = None) -> None:
    """One ``ImportError_`` listing every way recipe ``cfg`` (vocabulary ``vocab``: its
    model.vocab_size or its tokenizer's) does not describe ``hf``."""
    implied = implied_model(hf)
    problems = model_mismatches(implied, cfg.model, vocab, f"{hf.path / 'config.json'}")
    tok = cfg.data.tokenizer
    if cfg.data.source == "demo":
        problems.append("data.source: demo trains its own tokenizer, not the model's; use the "
                        f"model's tokenizer: data.tokenizer.path: {hf.tokenizer[1]}")
    elif tok.path and (why := check_tokenizers(hf, tok.type, tok.path)):
        problems.append(f"data.tokenizer: {why}; use data.tokenizer.type: {hf.tokenizer[0]}, "
                        f"path: {hf.tokenizer[1]}")
    if problems:
        raise ImportError_(f"the recipe does not describe the model in {hf.path} "
                           f"({len(problems)} difference{'s' * (len(problems) > 1)}): "
                           + "; ".join(problems), key=key, value=str(hf.path) if key else None)


def config_without_recipe(hf: HFModel, tokenizer: Path) -> RunConfig:
    """A run config for ``hf`` alone: its model, dtype and tokenizer (``tokenizer``: the copy);
    it names no training data (a recipe that trains from the import gives its own)."""
    from megatron_tst.config.loader import build_config

    model = {k: v for k, v in implied_model(hf).items()}
    model.update(params_dtype=hf.dtype, make_vocab_size_divisible_by=128)
    kind = hf.tokenizer[0]
    tree = {"name": hf.path.name or "imported", "model": model,
            "data": {"source": "indexed", "train_paths": [IMPORTED_DATA],
                     "tokenizer": {"type": kind, "path": str(tokenizer)}},
            "tst": {}, "logging": {"wandb": False}, "checkpoint": {"load": "none"}}
    return build_config(tree, {}, world_size=1)


#: ``data.train_paths`` of a run config written by an import without a recipe: it names no data.
IMPORTED_DATA = "<none: imported weights; a training recipe gives its data>"


# ---------------------------------------------------------------------------------- write
@dataclass
class ImportResult:
    out: Path
    checkpoint: Path
    architecture: str
    vocab_size: int
    padded_vocab_size: int
    dtype: str
    warnings: list[str] = field(default_factory=list)


def import_hf(hf_dir: str | Path, out: str | Path, *, recipe: Optional[RunConfig] = None,
              force: bool = False, key: Optional[str] = None) -> ImportResult:
    """Import ``hf_dir`` into the checkpoint root ``out`` (new or empty, or ``force``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ImportError_("import runs as one process: run `megatron-tst import ...` without "
                           "torchrun (any layout loads the result)")
    hf = read_hf_dir(hf_dir, key)
    implied = implied_model(hf)
    tok_kind, tok_file = hf.tokenizer
    from megatron_tst.data.tokenizer_files import open_tokenizer

    try:
        tok_vocab = open_tokenizer(tok_kind, tok_file).vocab_size
    except (ValueError, OSError, ImportError) as err:
        raise ImportError_(f"cannot load the model's tokenizer {tok_file}: {err}") from None
    if tok_vocab > hf.vocab_size:
        raise ImportError_(f"the tokenizer {tok_file} has {tok_vocab:,} entries but the model's "
                           f"vocab_size is {hf.vocab_size:,} (config.json): ids past it have no "
                           f"embedding row; it is not this model's tokenizer")
    if recipe is not None:
        check_recipe(hf, recipe, recipe.model.vocab_size or _entries(recipe) or tok_vocab)
    out = Path(out)
    tmp = prepare_outdir(out, force, hf.path, what="import", error=ImportError_)
    try:
        tokenizer = _copy_tokenizer(hf.path, tmp / TOKENIZER_DIR, out / TOKENIZER_DIR)
        cfg = recipe if recipe is not None else config_without_recipe(
            hf, out.resolve() / TOKENIZER_DIR / tok_file.name)
        padded = _padded(cfg, hf.vocab_size)
        warnings = []
        if DTYPE_NAMES[cfg.model.params_dtype].itemsize < DTYPE_NAMES[hf.dtype].itemsize:
            warnings.append(f"the weights are {hf.dtype} and the recipe's model.params_dtype is "
                            f"{cfg.model.params_dtype}: they are rounded")
        path = write_checkpoint(hf, cfg, tmp, padded, tok_vocab, source=str(hf.path.resolve()))
        (tmp / IMPORT_INFO).write_text(json.dumps({
            "source": str(hf.path.resolve()), "fingerprint": hf.fingerprint(),
            "architecture": hf.arch.hf_class,
            "vocab_size": hf.vocab_size, "padded_vocab_size": padded,
            "tokenizer": str(tokenizer), "hf_dtype": hf.dtype,
            "params_dtype": cfg.model.params_dtype, "recipe": recipe is not None,
            "implied_model": implied, "warnings": warnings}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportResult(out, out / path.name, hf.arch.hf_class, hf.vocab_size, padded,
                        cfg.model.params_dtype, warnings)


def _entries(cfg: RunConfig) -> Optional[int]:
    """The size of the recipe's tokenizer (None: it names none, or it cannot be read; the
    tokenizer check says why)."""
    from megatron_tst.data.tokenizer_files import open_tokenizer

    tok = cfg.data.tokenizer
    try:
        return open_tokenizer(tok.type, tok.path).vocab_size if tok.path else None
    except (ValueError, OSError, ImportError):
        return None


def _padded(cfg: RunConfig, vocab: int) -> int:
    from megatron_tst.plan import padded_vocab_size

    return padded_vocab_size(vocab, cfg.model.make_vocab_size_divisible_by,
                             cfg.parallel.tensor_model_parallel_size)


def _copy_tokenizer(src: Path, dst: Path, final: Path) -> Path:
    dst.mkdir()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return final


def write_checkpoint(hf: HFModel, cfg: RunConfig, root: Path, padded: int, tokenizer_vocab: int,
                     source: str) -> Path:
    """Build ``cfg``'s model in this process (TP=PP=EP=1), fill it from ``hf`` and save it as
    step 0 under ``root``; return the step directory."""
    from megatron_tst.export.source import build_models, inference_config, megatron_state
    from megatron_tst.plan import RunPlan
    from megatron_tst.training.checkpoint import TrainState, save_model_checkpoint

    one = inference_config(cfg.to_dict(), "none", parallel={}, micro_batch_size=1,
                           model={"transformer_impl": "local", "moe_grouped_gemm": False})
    with megatron_state(one):
        plan = RunPlan.build(one).with_vocab(hf.vocab_size, padded=padded)
        models, _ = build_models(plan, half_precision_wrapper=False)
        fill_model(models[0], hf, one, padded)
        state = TrainState(vocab_size=hf.vocab_size, tokenizer_vocab=tokenizer_vocab)
        return save_model_checkpoint(one, models, state, root, {"imported_from": source})


def fill_model(model, hf: HFModel, cfg: RunConfig, padded: int) -> None:
    """Copy ``hf``'s weights into ``model`` (TP=1) through ``mapping.weight_map``; every weight
    of both sides must be used."""
    params = {k: v for k, v in model.state_dict(keep_vars=True).items()
              if not k.endswith("_extra_state")}
    unused = {k for k in hf.weights if not k.endswith(IGNORED_SUFFIXES)}
    if not cfg.model.untie_embeddings:
        unused.discard("lm_head.weight")  # tied: some files hold a copy of the embedding
    with torch.no_grad(), hf.tensors() as get:
        for rule in weight_map(ModelShape.of(cfg.model), hf.arch.key, hf.vocab_size, padded):
            missing = [k for k in rule.hf if k not in hf.weights]
            if missing:
                raise ImportError_(f"{hf.path} has no weight {missing[0]!r}, which a "
                                   f"{hf.arch.hf_class} with this config.json has; the weights "
                                   f"do not match the config")
            tensor = rule.to_megatron(*[get(k) for k in rule.hf])
            target = params.pop(rule.megatron)
            if tuple(tensor.shape) != tuple(target.shape):
                raise ImportError_(f"{hf.path}: {', '.join(rule.hf)} make a tensor of shape "
                                   f"{tuple(tensor.shape)} for {rule.megatron}, which is "
                                   f"{tuple(target.shape)} in the model config.json describes")
            target.copy_(tensor.to(target.dtype))
            unused.difference_update(rule.hf)
    if params or unused:
        raise ImportError_(f"{hf.path}: weights without a counterpart: "
                           f"{', '.join(sorted(unused)[:6]) or '-'} in the files, "
                           f"{', '.join(sorted(params)[:6]) or '-'} in the megatron model")


# --------------------------------------------------------------------------------------- CLI
def run_import(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    recipe = None
    if args.recipe:
        from megatron_tst.config.loader import load_config

        recipe = load_config(args.recipe, args.overrides)  # its layout is checked at training
    elif args.overrides:
        raise ImportError_("overrides apply to a recipe: give --recipe RECIPE with them")
    result = import_hf(args.hf_dir, args.out, recipe=recipe, force=args.force)
    for warning in result.warnings:
        print(f"megatron-tst: warning: {warning}", file=sys.stderr)
    print(f"imported {args.hf_dir} ({result.architecture})\n  to          {result.checkpoint}\n"
          f"  as          {result.dtype}, vocabulary {result.vocab_size:,} (padded "
          f"{result.padded_vocab_size:,})\n  train with  checkpoint.init_from: {result.out}")
    return 0
