"""A saved checkpoint as the source of an export or an evaluation.

Shared by ``megatron-tst export`` and ``megatron-tst eval``: find the checkpoint (a ``step_*``
directory or a checkpoint root), check that it is a complete megatron-tst checkpoint of a known
format, read its stored run config and train state without loading any tensor, rebuild the
``RunConfig`` for another parallel layout, locate the run's tokenizer, build the model with the
trainer's own ``build_model_chunks`` and load only its weights (no optimizer, no scheduler, no
RNG) from the megatron dist checkpoint, which reshards from whatever TP/PP/EP layout wrote it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from megatron_tst import mcore
from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.config.loader import CLI, build_config
from megatron_tst.export.errors import CheckpointError

log = logging.getLogger(__name__)

DEMO_TOKENIZER = Path("data") / "tokenizer.model"  # under the run dir (data/demo.py)
EMBEDDING_KEY = "embedding.word_embeddings.weight"


@dataclass
class SavedCheckpoint:
    """What a checkpoint says about itself, read without loading the model."""

    path: Path
    run_config: dict  # the resolved RunConfig of the run that wrote it, as a plain dict
    train_state: dict  # TrainState as a dict: step, phase, bag_size, vocab_size, ...

    @property
    def step(self) -> int:
        return int(self.train_state.get("step", 0))

    @property
    def phase(self) -> str:
        return str(self.train_state.get("phase") or "")

    @property
    def saved_layout(self) -> dict:
        p = self.run_config.get("parallel", {})
        return {"tp": p.get("tensor_model_parallel_size", 1),
                "pp": p.get("pipeline_model_parallel_size", 1),
                "ep": p.get("expert_model_parallel_size", 1)}

    def phase_warning(self) -> Optional[str]:
        """A warning for a checkpoint of the superposition phase (not a next-token model)."""
        if self.phase != "superposition":
            return None
        s = self.train_state.get("bag_size", "s")
        return (f"{self.path} was saved at step {self.step}, in the superposition phase of a TST "
                f"run (bags of {s} tokens): it was trained to predict the next bag, not the next "
                f"token, so it is not a next-token model yet; its next-token loss and generations "
                f"are poor until the recovery phase. Use a checkpoint from the recovery phase "
                f"for evaluation")


# ---------------------------------------------------------------------------- finding it
def resolve_checkpoint(target: str | Path) -> Path:
    """The step directory ``target`` names: itself, or the newest complete one of a checkpoint
    root. Raises ``CheckpointError`` for anything that is not a complete megatron-tst checkpoint
    of a format this version reads."""
    from megatron_tst.training.checkpoint import (FORMAT_VERSION, LATEST, RECORD,
                                                  latest_checkpoint, saved_megatron_core,
                                                  step_dirs)

    path = Path(target)
    given = "give a checkpoint step_* directory or a checkpoint root (e.g. runs/NAME/checkpoints)"
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise CheckpointError(f"{path} does not exist{where}; {given}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory; {given}")
    if (path / LATEST).is_file() or (not (path / "metadata.json").is_file() and step_dirs(path)):
        try:
            found = latest_checkpoint(path)
        except ConfigError as err:
            raise CheckpointError(err.message) from None
        if found is None:
            raise CheckpointError(f"{path} holds no complete checkpoint (every step_* directory "
                                  f"in it is from an interrupted save)")
        path = found
    if not (path / "metadata.json").is_file():
        hint = (f"; it looks like a run directory: give {path / 'checkpoints'}"
                if (path / "checkpoints").is_dir() else "")
        raise CheckpointError(f"{path} is not a megatron dist checkpoint (no metadata.json); "
                              f"{given}{hint}")
    record = path / RECORD
    if not record.is_file():
        raise CheckpointError(
            f"{path} is not a complete megatron-tst checkpoint (no {RECORD}): its save was "
            f"interrupted, or another program wrote it. Use an earlier step_* directory, or the "
            f"checkpoint root (its 'latest' names the newest complete one)")
    try:
        version = json.loads(record.read_text())["format_version"]
    except (ValueError, KeyError, TypeError, OSError):
        version = None
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r} ({record}); this megatron-tst reads format "
            f"{FORMAT_VERSION}{' and older' if FORMAT_VERSION > 1 else ''}. Use the megatron-tst "
            f"version that wrote it (see run_config.yaml beside it)")
    if why := mcore.unreadable_checkpoint(saved_megatron_core(path)):
        raise CheckpointError(f"cannot read {path}: {why}")
    return path


def read_checkpoint(target: str | Path) -> SavedCheckpoint:
    """Resolve ``target`` and read the run config and train state stored in it."""
    from megatron_tst.training.checkpoint import load_common

    path = resolve_checkpoint(target)
    try:
        common = load_common(path)
    except Exception as err:  # megatron raises several kinds for unreadable files
        raise CheckpointError(f"cannot read the common state of {path} ({type(err).__name__}: "
                              f"{err}); the checkpoint is damaged or was not written by "
                              f"megatron-tst") from None
    if not isinstance(common, dict) or not isinstance(common.get("run_config"), dict) \
            or not isinstance(common.get("train_state"), dict):
        raise CheckpointError(f"{path} is a megatron dist checkpoint without megatron-tst's run "
                              f"config and train state: it was not written by megatron-tst")
    return SavedCheckpoint(path, common["run_config"], common["train_state"])


# ------------------------------------------------------------------------------- config
def checkpoint_config(saved: SavedCheckpoint, *, parallel: Optional[dict] = None,
                      model: Optional[dict] = None, micro_batch_size: Optional[int] = None,
                      overrides: Iterable[str] = (), world_size: int = 1) -> RunConfig:
    """The checkpoint's ``RunConfig`` rebuilt for inference in another layout.

    ``parallel`` replaces the saved parallel section (None: TP=PP=EP=1, no SP); ``model`` sets
    model keys that change the implementation only (e.g. ``transformer_impl``); ``overrides``
    are the user's dotted ``parallel.*`` / ``training.micro_batch_size`` overrides, applied last.
    TST is switched off (the weights are the same; inference is next-token), the optimizer is
    never loaded and the global batch is one micro-batch per data-parallel rank.
    """
    from megatron_tst.config.loader import _parse_override, _set_dotted

    tree = copy.deepcopy(saved.run_config)
    saved_parallel = tree.get("parallel", {})
    tree["parallel"] = {"backend": saved_parallel.get("backend", "auto"), **(parallel or {})}
    tree["model"] = {**tree.get("model", {}), **(model or {})}
    tree["tst"] = {}  # bag_size 1: the plain next-token forward
    tree["checkpoint"] = {"load": str(saved.path), "load_optimizer": False}
    tree.setdefault("logging", {})["wandb"] = False
    sources = {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
        sources[key] = CLI
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
    try:
        return build_config(tree, sources, world_size=world_size)
    except ConfigError as err:
        if err.key in sources or (err.key or "").startswith("parallel."):
            raise
        raise CheckpointError(f"the run config stored in {saved.path} is not one this "
                              f"megatron-tst accepts ({err}); read it with the megatron-tst "
                              f"version that wrote the checkpoint") from None


# ---------------------------------------------------------------------------- tokenizer
@dataclass
class TokenizerLocation:
    kind: str  # sentencepiece | huggingface
    path: Path
    eod_token: Optional[str] = None


def find_tokenizer(saved: SavedCheckpoint, override: Optional[str] = None) -> TokenizerLocation:
    """The run's tokenizer: ``override`` if given; for the demo corpus the tokenizer trained into
    the run directory (found beside the checkpoint, ``<run_dir>/checkpoints/step_*``, or at the
    run directory the config names); otherwise ``data.tokenizer.path``."""
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

    from megatron_tst.models.gpt import padded_vocab_size

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


def build_models(cfg: RunConfig, padded_vocab: int, *, half_precision_wrapper: bool = True):
    """(models, modules): this rank's model chunks as the trainer builds them
    (``build_model_chunks``), on the process's device, in eval mode; ``modules`` wraps each in
    megatron's ``Float16Module`` for half-precision weights (as the trainer's DDP wrapper does,
    without gradient buffers), ``models`` are the bare GPTModels that the checkpoint keys name."""
    from megatron.core.transformer.module import Float16Module

    from megatron_tst.models.gpt import build_model_chunks

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    models = [m.to(device).eval() for m in build_model_chunks(cfg, padded_vocab)]
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

    keys = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    sharded = {k: m.sharded_state_dict(metadata=SHARDING_METADATA) for k, m in zip(keys, models)}
    with torch.no_grad():
        try:
            loaded = dist_checkpointing.load(sharded, str(path))
        except Exception as err:
            raise CheckpointError(
                f"cannot load the model weights of {path} into the model its run config "
                f"describes ({type(err).__name__}: {str(err)[:600]})") from None
        for k, m in zip(keys, models):
            m.load_state_dict(loaded[k])
