"""Checkpoints through megatron-core ``dist_checkpointing``.

Layout of ``checkpoint.dir``::

    latest                  name of the newest complete checkpoint (written last, atomically)
    step_0000100/           one dist checkpoint: model, optimizer, LR schedule, train state
        run_config.yaml     the resolved run config, human-readable
        ...                 megatron's sharded files (resharding-capable across TP/PP/DP)
        checkpoint.json     the completion record (format version, step, the megatron-core and
                            torch that wrote it), written after every rank has finished: a
                            directory without it is never loaded

Order of a save: every rank writes, barrier, run_config.yaml, checkpoint.json, ``latest``, then
retention. A process killed at any point leaves ``latest`` on a complete checkpoint, so a resume
uses the previous complete one (and says which incomplete directories it skipped). Retention
counts complete checkpoints only, never removes the one ``latest`` names, and removes incomplete
leftovers of crashed saves. ``MEGATRON_TST_FAILPOINT=<point>[@step]`` kills the process with
SIGKILL at a named point of a save (``FAILPOINTS``, ``training/failpoints.py``): the crash-safety
tests use it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_tst import mcore
from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.config.loader import config_to_yaml
from megatron_tst.training.failpoints import kill_if
from megatron_tst.training.optim import inner_optimizers

log = logging.getLogger(__name__)

LATEST = "latest"
RECORD = "checkpoint.json"  # completion record, written last inside a step directory
FORMAT_VERSION = 1  # bump when the saved state's layout changes incompatibly
STEP_DIR = re.compile(r"^step_(\d+)$")
FAILPOINTS = ("save:before_write", "save:after_write", "save:before_record", "save:before_latest",
              "save:before_prune", "prune:after_first_delete")
# Distributed-optimizer state is saved dp-reshardable so a run can resume on another DP size.
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


@dataclass
class TrainState:
    """Where the run is: saved in every checkpoint and restored on resume."""

    step: int = 0  # optimizer steps completed
    consumed_samples: int = 0  # model samples (of L positions) run so far, all DP ranks
    consumed_tokens: int = 0  # data tokens read so far: the position in the data stream
    phase: str = ""  # phase of the last completed step: standard | superposition | recovery
    bag_size: int = 1  # tokens per position in that step (s in the superposition phase)
    data_chunk: int = 1  # the data stream is cut in chunks of data_chunk * seq_length tokens
    vocab_size: int = 0  # the model's vocabulary before padding (0: unknown)
    skipped_steps: int = 0  # steps whose update was skipped (training.nonfinite=skip)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / RECORD).is_file()


def check_format(path: Path) -> None:
    """Refuse a directory that is not a complete megatron-tst checkpoint of a known format."""
    record = Path(path) / RECORD
    if not record.is_file():
        raise ConfigError(
            f"{path} is not a complete megatron-tst checkpoint (no {RECORD}): its save was "
            f"interrupted, or it was written by another program. Use an earlier step_* "
            f"directory (or checkpoint.load=auto, which finds the newest complete one)",
            key="checkpoint.load", value=str(path))
    try:
        version = json.loads(record.read_text())["format_version"]
    except (ValueError, KeyError, TypeError):
        version = None
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ConfigError(
            f"{path} has checkpoint format {version!r}; this megatron-tst reads format "
            f"{FORMAT_VERSION}{' and older' if FORMAT_VERSION > 1 else ''}. Load it with the "
            f"megatron-tst version that wrote it (see run_config.yaml beside it), or start "
            f"fresh with checkpoint.load=none", key="checkpoint.load", value=str(path))
    if why := mcore.unreadable_checkpoint(saved_megatron_core(path)):
        raise ConfigError(f"cannot load {path}: {why}", key="checkpoint.load", value=str(path))


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every step_* directory under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if p.is_dir() and (m := STEP_DIR.match(p.name)))


def latest_checkpoint(ckpt_dir: str | Path) -> Optional[Path]:
    """The checkpoint to resume from in a checkpoint root: the one ``latest`` names, or (no
    ``latest`` yet: the first save was interrupted after completing) the newest complete one.
    None when there is none. Newer directories that are skipped are named in a warning."""
    root = Path(ckpt_dir)
    marker = root / LATEST
    dirs = step_dirs(root)
    if marker.is_file():
        path = root / marker.read_text().strip()
        if not path.is_dir():
            raise ConfigError(f"{marker} names {path.name}, which does not exist; point "
                              f"checkpoint.load at an existing step_* directory",
                              key="checkpoint.load", value="auto")
    else:
        complete = [p for _, p in dirs if is_complete(p)]
        path = complete[-1] if complete else None
        if path is not None:
            log.warning("%s has no '%s' file (a save was interrupted before writing it): "
                        "resuming from the newest complete checkpoint, %s", root, LATEST, path.name)
    named = int(STEP_DIR.match(path.name).group(1)) if path and STEP_DIR.match(path.name) else -1
    for step, other in dirs:
        if step > named:
            why = ("complete but not named by 'latest' (the save was interrupted before "
                   f"updating it): set checkpoint.load={other} to resume from it instead"
                   if is_complete(other) else "incomplete (a save was interrupted)")
            log.warning("skipping %s: %s; resuming from %s", other, why,
                        path.name if path else "scratch")
    return path


def resolve_load_path(cfg: RunConfig) -> Optional[Path]:
    """The checkpoint this run starts from (None: fresh), checked complete and readable."""
    load = cfg.checkpoint.load
    if load == "none":
        return None
    path = Path(cfg.checkpoint_dir if load == "auto" else load)
    if (path / LATEST).is_file() or load == "auto":  # a checkpoint root, not a step directory
        path = latest_checkpoint(path)
        if path is not None:
            check_format(path)
        return path
    if not (path / "metadata.json").is_file():
        raise ConfigError(f"{path} is not a megatron dist checkpoint (no metadata.json); give a "
                          f"step_* directory or a checkpoint root with a '{LATEST}' file",
                          key="checkpoint.load", value=load)
    check_format(path)
    return path



# ---------------------------------------------------------------------------- state dicts
def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state_dict(model_chunks, optimizer, scheduler, train_state: TrainState,
                        cfg: RunConfig, is_loading: bool, with_optimizer: bool = True) -> dict:
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = {}
    for i, chunk in enumerate(model_chunks):
        key = "model" if len(model_chunks) == 1 else f"model{i}"
        # DDP holds the model (or Float16Module) as .module; keys must not carry that prefix.
        model_sd[key] = chunk.module.sharded_state_dict(metadata=SHARDING_METADATA)
    pp, tp = (parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_tensor_model_parallel_world_size())
    rng = ShardedObject(
        "rng_state", _rng_state(), (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(),
         parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))
    if with_optimizer:
        model_sd["optimizer"] = optimizer.sharded_state_dict(
            model_sd["model"] if len(model_chunks) == 1 else model_sd,
            is_loading=is_loading, metadata=SHARDING_METADATA)
    return {
        **model_sd,
        "scheduler": scheduler.state_dict(),
        "train_state": asdict(train_state),
        "run_config": cfg.to_dict(),
        "rng_state": rng,
    }


# ---------------------------------------------------------------------------------- saving
def save_checkpoint(cfg: RunConfig, model_chunks, optimizer, scheduler,
                    train_state: TrainState) -> Path:
    """Save on all ranks; then rank 0 writes the completion record, points ``latest`` at it and
    applies retention (see the module docstring for why in this order)."""
    from megatron.core import dist_checkpointing

    root = Path(cfg.checkpoint_dir)
    step = train_state.step
    path = root / step_dir_name(step)
    rank = dist.get_rank()
    if rank == 0:
        if path.exists():
            _set_aside(path)
        path.mkdir(parents=True)
    dist.barrier()
    kill_if("save:before_write", step)
    state = _sharded_state_dict(model_chunks, optimizer, scheduler, train_state, cfg,
                                is_loading=False)
    dist_checkpointing.save(state, str(path))
    kill_if("save:after_write", step)
    dist.barrier()
    if rank == 0:
        (path / "run_config.yaml").write_text(config_to_yaml(cfg))
        kill_if("save:before_record", step)
        _write_atomic(path / RECORD, json.dumps(
            {"format_version": FORMAT_VERSION, "step": step, "phase": train_state.phase,
             "consumed_tokens": train_state.consumed_tokens,
             "megatron_core": str(mcore.installed()), "torch": torch.__version__},
            indent=2) + "\n")
        kill_if("save:before_latest", step)
        _write_atomic(root / LATEST, path.name + "\n")
        kill_if("save:before_prune", step)
        _prune(root, cfg.checkpoint.keep_last, keep=path)
    dist.barrier()
    return path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _set_aside(path: Path) -> None:
    """A step directory about to be rewritten: delete an incomplete one; keep a complete one
    (a run resumed from an earlier step into the same directory) under a new name."""
    if not is_complete(path):
        shutil.rmtree(path)
        return
    aside = path.with_name(f"{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    log.warning("%s exists from an earlier run of this directory: keeping it as %s", path, aside)
    os.replace(path, aside)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    """Keep the newest ``keep_last`` complete checkpoints and ``keep`` (the one ``latest``
    names); remove older complete ones and incomplete leftovers of crashed saves."""
    dirs = step_dirs(root)
    complete = [p for _, p in dirs if is_complete(p)]
    doomed = [p for _, p in dirs if not is_complete(p) and p != keep]
    if keep_last > 0:
        doomed += [p for p in complete[:-keep_last] if p != keep]
    for i, old in enumerate(doomed):
        shutil.rmtree(old, ignore_errors=True)
        if i == 0:
            kill_if("prune:after_first_delete", int(STEP_DIR.match(keep.name).group(1)))


# --------------------------------------------------------------------------------- loading
def load_checkpoint(path: Path, cfg: RunConfig, model_chunks, optimizer,
                    scheduler) -> TrainState:
    """Restore model, optimizer, scheduler and RNG in place; return the saved train state.

    With ``checkpoint.load_optimizer: false`` the Adam moments start fresh (the step, the data
    position and the LR schedule still continue): for loading across layouts whose optimizer
    state megatron cannot reshard (e.g. a different expert-parallel size).
    """
    from megatron.core import dist_checkpointing

    with_optimizer = cfg.checkpoint.load_optimizer
    if with_optimizer:
        _materialize_optimizer_state(optimizer)
    state = _sharded_state_dict(model_chunks, optimizer, scheduler, TrainState(), cfg,
                                is_loading=True, with_optimizer=with_optimizer)
    saved_layout = _saved_layout(path)
    if saved_layout != _current_layout():
        log.warning("checkpoint %s was written with (PP, TP)=%s, this run has %s: RNG states are "
                    "not restored", path, saved_layout, _current_layout())
        state.pop("rng_state")
    written_by = saved_megatron_core(path)
    if written_by not in (None, str(mcore.installed())):
        log.info("checkpoint %s was written by megatron-core %s; loading it with %s", path,
                 written_by, mcore.installed())
    try:
        with torch.no_grad():  # the distributed optimizer copies into views of the fp32 weights
            loaded = dist_checkpointing.load(state, str(path))
            for i, chunk in enumerate(model_chunks):
                chunk.load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"])
            if with_optimizer:
                optimizer.load_state_dict(loaded["optimizer"])
                _sync_optimizer_step_counts(optimizer)
    except Exception as err:
        if written_by in (None, str(mcore.installed())):
            raise
        raise ConfigError(
            f"{path} was written by megatron-core {written_by} and megatron-core "
            f"{mcore.installed()} cannot load it ({type(err).__name__}: {str(err)[:300]}); "
            f"resume it with megatron-core {written_by}", key="checkpoint.load",
            value=str(path)) from None
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return TrainState(**loaded["train_state"])


def saved_megatron_core(path: Path) -> Optional[str]:
    """The megatron-core version recorded in a checkpoint's completion record (None: older
    checkpoints, which did not record it)."""
    try:
        version = json.loads((Path(path) / RECORD).read_text()).get("megatron_core")
    except (OSError, ValueError, AttributeError):
        return None
    return version if isinstance(version, str) else None


def load_common(path: Path) -> dict:
    """A checkpoint's common state (run_config, train_state, scheduler), without the model."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(path))


def load_saved_config(path: Path) -> dict:
    """The run config stored in a checkpoint (plain dict), without touching the model."""
    return load_common(path)["run_config"]


def _current_layout() -> tuple[int, int]:
    from megatron.core import parallel_state

    return (parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size())


def _saved_layout(path: Path) -> tuple[int, int]:
    saved = load_saved_config(path)["parallel"]
    return saved["pipeline_model_parallel_size"], saved["tensor_model_parallel_size"]


def _materialize_optimizer_state(optimizer) -> None:
    """Create Adam's moment tensors before loading, so the sharded state dict has targets.

    A step with all-zero gradients on freshly built state; the loaded values overwrite it.
    """
    for inner in inner_optimizers(optimizer):
        if any(len(s) for s in inner.state.values()):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        saved_lrs = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
        params = [p.detach().clone() for g in inner.param_groups for p in g["params"]]
        inner.step()
        with torch.no_grad():
            for p, saved in zip((p for g in inner.param_groups for p in g["params"]), params):
                p.copy_(saved)
        for g, lr in zip(inner.param_groups, saved_lrs):
            g["lr"] = lr
        for group in inner.param_groups:
            for p in group["params"]:
                p.grad = None


def _sync_optimizer_step_counts(optimizer) -> None:
    """torch's AdamW keeps a per-parameter ``step``; megatron saves it per param group."""
    for inner in inner_optimizers(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                st = inner.state.get(p)
                if st and "step" in st:
                    st["step"] = torch.as_tensor(group["step"], dtype=st["step"].dtype)
