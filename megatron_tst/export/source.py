"""A saved checkpoint as the source of an export or an evaluation.

Shared by ``megatron-tst export`` and ``megatron-tst eval``. The checkpoint is found, checked and
read by ``training/saved.py`` (``open_checkpoint``, the one checkpoint reader); this module
rebuilds its ``RunConfig`` for another parallel layout, locates the run's tokenizer, builds the
model with the trainer's own ``build_model_chunks`` and loads only its weights (no optimizer, no
scheduler, no RNG) from the megatron dist checkpoint, which reshards from whatever TP/PP/EP
layout wrote it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.config.loader import apply_overrides, build_config
from megatron_tst.plan import RunPlan, padded_vocab_size
from megatron_tst.training.saved import (EMBEDDING_KEY, CheckpointError, SavedCheckpoint,
                                         load_errors, model_keys)

log = logging.getLogger(__name__)

DEMO_TOKENIZER = Path("data") / "tokenizer.model"  # under the run dir (data/demo.py)


# ------------------------------------------------------------------------------- config
def checkpoint_config(saved: SavedCheckpoint, *, parallel: Optional[dict] = None,
                      model: Optional[dict] = None, micro_batch_size: Optional[int] = None,
                      overrides: Iterable[str] = (), world_size: int = 1) -> RunConfig:
    """The checkpoint's ``RunConfig`` rebuilt for inference (``inference_config``); a stored
    config this megatron-tst refuses is a ``CheckpointError``."""
    try:
        return inference_config(saved.run_config, str(saved.path), parallel=parallel,
                                model=model, micro_batch_size=micro_batch_size,
                                overrides=overrides, world_size=world_size)
    except ConfigError as err:
        if err.key in set(_override_keys(overrides)) or (err.key or "").startswith("parallel."):
            raise
        raise CheckpointError(f"the run config stored in {saved.path} is not one this "
                              f"megatron-tst accepts ({err}); read it with the megatron-tst "
                              f"version that wrote the checkpoint") from None


def _override_keys(overrides: Iterable[str]) -> list[str]:
    return [o.split("=", 1)[0].strip() for o in overrides]


def inference_config(run_config: dict, load: str, *, parallel: Optional[dict] = None,
                     model: Optional[dict] = None, micro_batch_size: Optional[int] = None,
                     overrides: Iterable[str] = (), world_size: int = 1) -> RunConfig:
    """A run config (``run_config``, a plain dict) rebuilt for inference in another layout,
    loading ``load``.

    ``parallel`` replaces the saved parallel section (None: TP=PP=EP=1, no SP); ``model`` sets
    model keys that change the implementation only (e.g. ``transformer_impl``); ``overrides``
    are the user's dotted ``parallel.*`` / ``training.micro_batch_size`` overrides, applied last.
    TST is switched off (the weights are the same; inference is next-token), the optimizer is
    never loaded and the global batch is one micro-batch per data-parallel rank.
    """
    tree = copy.deepcopy(run_config)
    saved_parallel = tree.get("parallel", {})
    tree["parallel"] = {"backend": saved_parallel.get("backend", "auto"), **(parallel or {})}
    tree["model"] = {**tree.get("model", {}), **(model or {})}
    tree["tst"] = {}  # bag_size 1: the plain next-token forward
    tree["checkpoint"] = {"load": load, "load_optimizer": False}
    tree.setdefault("logging", {})["wandb"] = False
    sources = apply_overrides(tree, overrides)
    t = tree.setdefault("training", {})
    if micro_batch_size is not None and "training.micro_batch_size" not in sources:
        t["micro_batch_size"] = micro_batch_size
    p = tree["parallel"]
    model_parallel = (p.get("tensor_model_parallel_size", 1)
                      * p.get("pipeline_model_parallel_size", 1))
    dp = max(world_size // model_parallel, 1)
    microbatches = p.get("pipeline_model_parallel_size", 1) if p.get(
        "virtual_pipeline_model_parallel_size") else 1
    t["global_batch_size"] = t.get("micro_batch_size", 1) * dp * microbatches
    t["exit_at_step"] = None
    return build_config(tree, sources, world_size=world_size)


# ---------------------------------------------------------------------------- tokenizer
@dataclass
class TokenizerLocation:
    kind: str  # sentencepiece | huggingface
    path: Path
    eod_token: Optional[str] = None


def find_tokenizer(saved: SavedCheckpoint, override: Optional[str] = None) -> TokenizerLocation:
    """The run's tokenizer: ``override`` if given; for the demo corpus the tokenizer trained into
    the run directory (found beside the checkpoint, ``<run_dir>/checkpoints/step_*``, or at the
    run directory the config names); otherwise ``data.tokenizer.path``, or the file of that name
    in ``tokenizer/`` beside the checkpoint (an import's copy, when the import was moved)."""
    data = saved.run_config.get("data", {})
    tok = data.get("tokenizer", {}) or {}
    eod_token = tok.get("eod_token")
    if override is not None:
        path = Path(override)
        if not path.exists():
            raise CheckpointError(f"--tokenizer {override}: no such file or directory")
        kind = "huggingface" if path.is_dir() or path.suffix == ".json" else "sentencepiece"
        return TokenizerLocation(kind, path, eod_token if kind == "huggingface" else None)
    fix = "pass --tokenizer PATH (the run's tokenizer file)"
    if data.get("source") == "demo":
        run_dir = str(saved.run_config.get("run_dir", "runs/${name}")).replace(
            "${name}", str(saved.run_config.get("name", "run")))
        candidates = [saved.path.parent.parent / DEMO_TOKENIZER, Path(run_dir) / DEMO_TOKENIZER]
        for path in candidates:
            if path.is_file():
                return TokenizerLocation("sentencepiece", path)
        raise CheckpointError(f"the demo run's tokenizer is not at {candidates[0]} nor at "
                              f"{candidates[1]} (the run directory was moved or its data "
                              f"deleted); {fix}")
    path = tok.get("path")
    if not path:
        raise CheckpointError(f"the run config stored in {saved.path} names no tokenizer "
                              f"(data.tokenizer.path); {fix}")
    beside = saved.path.parent / "tokenizer" / Path(path).name  # an import's copy, moved with it
    if not Path(path).exists() and beside.is_file():
        path = str(beside)
    if not Path(path).exists():
        where = ("" if Path(path).is_absolute()
                 else f" (relative to the working directory {Path.cwd()})")
        raise CheckpointError(f"the run's tokenizer {path} (data.tokenizer.path) is not found"
                              f"{where}; {fix}")
    kind = tok.get("type", "sentencepiece")
    return TokenizerLocation(kind, Path(path), eod_token if kind == "huggingface" else None)


def open_run_tokenizer(location: TokenizerLocation):
    """The tokenizer as ``megatron_tst.data.tokenizer`` loads it (tokenize/detokenize, eod)."""
    from megatron_tst.data.tokenizer import load_tokenizer

    options = {"eod_token": location.eod_token} if location.kind == "huggingface" and \
        location.eod_token else {}
    try:
        return load_tokenizer(location.kind, location.path, **options)
    except (ValueError, OSError, ImportError) as err:
        raise CheckpointError(f"cannot load the tokenizer {location.path} as a {location.kind} "
                              f"tokenizer: {err}") from None


# ------------------------------------------------------------------------------ process
@contextlib.contextmanager
def megatron_state(cfg: RunConfig):
    """The process group and megatron's parallel state for ``cfg``'s layout (``init_distributed``,
    as the trainer does), torn down after unless the caller had already set them up (then they
    must match: e.g. a test session's one-process group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_tst.training.distributed import init_distributed

    made_group, made_state = not dist.is_initialized(), not ps.model_parallel_is_initialized()
    if not made_state:
        p = cfg.parallel
        have = (ps.get_tensor_model_parallel_world_size(),
                ps.get_pipeline_model_parallel_world_size(),
                ps.get_expert_model_parallel_world_size())
        want = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                p.expert_model_parallel_size)
        if have != want:
            raise ConfigError(f"this process already has megatron's parallel state for "
                              f"(TP, PP, EP)={have}, not {want}",
                              key="parallel.tensor_model_parallel_size", value=want[0])
    env = init_distributed(cfg)
    try:
        yield env
    finally:
        if made_state and ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        if made_group and dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------ weights
def vocab_sizes(saved: SavedCheckpoint, tokenizer_vocab: Optional[int] = None) -> tuple[int, int]:
    """(vocabulary, padded vocabulary) of the saved model. The padded size is the embedding's
    global shape in the checkpoint (it depends on the TP size that trained it)."""
    from megatron.core import dist_checkpointing

    m = saved.run_config.get("model", {})
    vocab = int(saved.train_state.get("vocab_size") or m.get("vocab_size") or tokenizer_vocab or 0)
    try:
        meta = dist_checkpointing.load_tensors_metadata(str(saved.path))
        padded = int(meta[EMBEDDING_KEY].global_shape[0])
    except Exception:  # older megatron or another key layout: megatron's padding rule
        padded = padded_vocab_size(vocab, m.get("make_vocab_size_divisible_by", 128),
                                   saved.saved_layout["tp"])
    if not vocab:
        vocab = padded
    return vocab, padded


def build_models(plan: RunPlan, *, half_precision_wrapper: bool = True):
    """(models, modules): this rank's model chunks as the trainer builds them
    (``build_model_chunks``, with the plan's padded vocabulary), on the process's device, in eval
    mode; ``modules`` wraps each in megatron's ``Float16Module`` for half-precision weights (as
    the trainer's DDP wrapper does, without gradient buffers), ``models`` are the bare GPTModels
    that the checkpoint keys name."""
    from megatron.core.transformer.module import Float16Module

    from megatron_tst.models.gpt import build_model_chunks

    cfg = plan.cfg
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    models = [m.to(device).eval() for m in build_model_chunks(cfg, plan)]
    modules = models
    if half_precision_wrapper and cfg.model.params_dtype != "float32":
        modules = [Float16Module(m.config, m).eval() for m in models]
    for m in models:
        for p in m.parameters():
            p.requires_grad_(False)
    return models, modules


def load_model_weights(path: Path, models: list) -> None:
    """Load the model weights of checkpoint ``path`` into ``models`` (this rank's bare chunks),
    resharding from the layout that saved them; nothing else is read."""
    from megatron.core import dist_checkpointing

    from megatron_tst.training.checkpoint import SHARDING_METADATA

    keys = model_keys(len(models))
    sharded = {k: m.sharded_state_dict(metadata=SHARDING_METADATA) for k, m in zip(keys, models)}
    with torch.no_grad():
        try:
            loaded = dist_checkpointing.load(sharded, str(path))
        except load_errors() as err:
            raise CheckpointError(
                f"cannot load the model weights of {path} into the model its run config "
                f"describes ({type(err).__name__}: {str(err)[:600]})") from None
        for k, m in zip(keys, models):
            m.load_state_dict(loaded[k])
