"""Saving and loading the live training state through megatron-core ``dist_checkpointing``.

What a checkpoint directory holds, and how one is found, checked and read without loading it, is
``training/saved.py``. A save writes model, optimizer, LR schedule, RNG and train state on every
rank, then (rank 0) ``run_config.yaml``, the completion record ``checkpoint.json`` (format version,
step, the megatron-core and torch that wrote it), ``latest``, and applies retention. A process
killed at any point leaves ``latest`` on a complete checkpoint, so a resume uses the previous
complete one (and says which incomplete directories it skipped). Retention counts complete
checkpoints only, never removes the one ``latest`` names, and removes incomplete leftovers of
crashed saves. With ``checkpoint.async_save`` the files are written in the background
(``training/async_save.py``) and the same record, ``latest`` and retention follow once every
rank's writer is done. ``MEGATRON_TST_FAILPOINT=<point>[@step]`` kills the process with
SIGKILL at a named point of a save (``FAILPOINTS``, ``training/failpoints.py``): the
crash-safety tests use it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_tst import mcore
from megatron_tst.config import RunConfig
from megatron_tst.config.loader import config_to_yaml
from megatron_tst.training import async_save, failpoints
from megatron_tst.training.async_save import BackgroundSaves
from megatron_tst.training.failpoints import kill_if
from megatron_tst.training.optim import TrainingOptimizer
from megatron_tst.training.saved import (FORMAT_VERSION, LATEST, RECORD, STEP_DIR,
                                         CheckpointError, DamagedCheckpointError,
                                         SavedCheckpoint, checkpoint_files, damaged,
                                         digest_files, is_complete,
                                         latest_checkpoint, load_errors, model_keys,
                                         open_checkpoint, record_files, step_dir_name,
                                         step_dirs, verify_files)
from megatron_tst.training.write_digests import written_digests

log = logging.getLogger(__name__)

FAILPOINTS = ("save:before_write", "save:writing", "save:after_write", "save:before_record",
              "save:before_latest", "save:before_prune", "prune:after_first_delete")  # SIGKILL
# ``save:writing``: background saves only, the writers still writing; in a background save
# ``save:after_write`` is the start of its finalization.
# ``save:disk_full``: the write fails with ENOSPC after writing part of a file
# ``save:slow_copy``: a CPU background save's copy of the state starts 2 s late (it is then made
# when the trainer releases it, after the next step's forward and backward)
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
    tokenizer_vocab: int = 0  # entries of the run's tokenizer (0: unknown, older checkpoints)
    skipped_steps: int = 0  # steps whose update was skipped (training.nonfinite=skip)


def resolve_load_path(cfg: RunConfig) -> Optional[SavedCheckpoint]:
    """The checkpoint this run starts from (None: fresh), checked, verified on all ranks and
    read (``saved.py``). With ``checkpoint.load=auto`` a damaged checkpoint is skipped, named,
    for the newest intact one; an explicit path that is damaged is refused."""
    load = cfg.checkpoint.load
    if load == "none":
        return None
    if load != "auto":
        saved = open_checkpoint(load, key="checkpoint.load", verify=False)
        if problem := verified_on_all_ranks(saved):
            raise problem
        return saved
    root = Path(cfg.checkpoint_dir)
    path, skipped = latest_checkpoint(root), []
    while path is not None:
        try:
            saved = open_checkpoint(path, key="checkpoint.load", verify=False)
            problem = verified_on_all_ranks(saved)
        except DamagedCheckpointError as err:
            problem = err
        if problem is None:
            if skipped:
                log.warning("resuming from %s, the newest intact checkpoint of %s (skipped: %s)",
                            path.name, root, ", ".join(skipped))
            return saved
        log.warning("%s", problem.message)
        skipped.append(path.name)
        step = int(STEP_DIR.match(path.name).group(1))
        older = [p for s, p in step_dirs(root) if s < step and is_complete(p)]
        path = older[-1] if older else None
    if skipped:
        raise DamagedCheckpointError(
            f"every complete checkpoint in {root} is damaged ({', '.join(skipped)}; see the "
            f"warnings above): refusing to start over in a run directory that holds a run. "
            f"Restore a copy, or start fresh with checkpoint.load=none or another run_dir",
            key="checkpoint.load", value=load)
    return None


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


def _sharded_state_dict(model_chunks, optimizer: TrainingOptimizer, train_state: TrainState,
                        cfg: RunConfig, is_loading: bool, with_optimizer: bool = True) -> dict:
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    # DDP holds the model (or Float16Module) as .module; keys must not carry that prefix.
    model_sd = {key: chunk.module.sharded_state_dict(metadata=SHARDING_METADATA)
                for key, chunk in zip(model_keys(len(model_chunks)), model_chunks)}
    pp, tp = _current_layout()
    rng = ShardedObject(
        "rng_state", _rng_state(), (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(),
         parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))
    if with_optimizer:
        model_sd["optimizer"] = optimizer.optimizer.sharded_state_dict(
            model_sd["model"] if len(model_chunks) == 1 else model_sd,
            is_loading=is_loading, metadata=SHARDING_METADATA)
    return {
        **model_sd,
        "scheduler": optimizer.scheduler.state_dict(),
        "train_state": asdict(train_state),
        "run_config": cfg.to_dict(),
        "rng_state": rng,
    }


# ---------------------------------------------------------------------------------- saving
def save_checkpoint(cfg: RunConfig, model_chunks, optimizer: TrainingOptimizer,
                    train_state: TrainState, protect: Optional[Path] = None,
                    background: Optional[BackgroundSaves] = None) -> Path:
    """Save on all ranks; then rank 0 writes the completion record, points ``latest`` at it and
    applies retention (see the module docstring for why in this order), which never removes
    ``protect`` (the last checkpoint before a streak of skipped non-finite steps).

    With ``background`` (``checkpoint.async_save``) the files are written by megatron's async
    writer and the record, ``latest`` and retention follow when ``background.poll`` finds every
    rank's write finished (``training/async_save.py``); the returned directory is pending."""
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
    state = _sharded_state_dict(model_chunks, optimizer, train_state, cfg, is_loading=False)
    record = {"format_version": FORMAT_VERSION, "step": step, "phase": train_state.phase,
              "consumed_tokens": train_state.consumed_tokens}
    if background is not None:
        background.schedule(
            async_save.request(state, path, background.staging, defer=background.overlap,
                               hold_s=2.0 if failpoints.active("save:slow_copy", step) else 0),
            path, step,
            complete=lambda: _complete_background(cfg, path, record, protect),
            on_failure=lambda err: _background_failure(cfg, path, err))
        kill_if("save:writing", step)  # the writer processes are still writing
        # SIGTERM now, to the writer processes too; the writers are held 2 s
        failpoints.signal_if("save:signal", step, children=True)
        return path
    try:
        failpoints.fill_disk_if(step, path, rank)  # a write that fills the disk
        with written_digests(path) as written:
            dist_checkpointing.save(state, str(path))
    except Exception as err:
        if not _out_of_space(err, root):
            raise
        shutil.rmtree(path, ignore_errors=True)  # the partial save: free what it took
        raise SaveError(_disk_full_message(cfg, path, root), reason="disk_full") from err
    kill_if("save:after_write", step)
    dist.barrier()
    _complete(cfg, path, record, _gather_digests(path, written), protect)
    return path


def save_model_checkpoint(cfg: RunConfig, models, train_state: TrainState, root: Path,
                          record: dict) -> Path:
    """A weights-only checkpoint of bare model chunks (no optimizer, schedule or RNG) as step
    ``train_state.step`` of ``root``, complete as a training save is (record, ``latest``):
    what ``megatron-tst import`` writes and ``checkpoint.init_from`` loads."""
    from megatron.core import dist_checkpointing

    path = Path(root) / step_dir_name(train_state.step)
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)  # an earlier attempt (downstream weights)
        path.mkdir(parents=True)
    dist.barrier()
    state = {key: m.sharded_state_dict(metadata=SHARDING_METADATA)
             for key, m in zip(model_keys(len(models)), models)}
    state.update(train_state=asdict(train_state), run_config=cfg.to_dict())
    with written_digests(path) as written:
        dist_checkpointing.save(state, str(path))
    dist.barrier()
    _complete(cfg, path, {"format_version": FORMAT_VERSION, "step": train_state.step,
                          "phase": train_state.phase, "consumed_tokens": 0, **record},
              _gather_digests(path, written), None)
    return path


def _complete(cfg: RunConfig, path: Path, record: dict, files: dict,
              protect: Optional[Path]) -> None:
    """Rank 0: run_config.yaml, the completion record, ``latest``, retention; then a barrier."""
    root, step = path.parent, record["step"]
    if dist.get_rank() == 0:
        (path / "run_config.yaml").write_text(config_to_yaml(cfg))
        kill_if("save:before_record", step)
        _write_atomic(path / RECORD, json.dumps(
            {**record, "megatron_core": str(mcore.installed()), "torch": torch.__version__,
             "files": files}, indent=2) + "\n")
        kill_if("save:before_latest", step)
        _write_atomic(root / LATEST, path.name + "\n")
        kill_if("save:before_prune", step)
        _prune(root, cfg.checkpoint.keep_last, keep=path, protect=protect)
    dist.barrier()


def _complete_background(cfg: RunConfig, path: Path, record: dict,
                         protect: Optional[Path]) -> None:
    """Finalization of a background save, on every rank once every writer is done: the digests
    the writers left, rank 0 checksums the rest (megatron's metadata), then as ``_complete``."""
    kill_if("save:after_write", record["step"])
    files, errors, enospc = async_save.gather_digests(path)
    if errors:
        raise _BackgroundWriteFailed("; ".join(errors), enospc)
    dist.barrier()  # every digest file is removed
    if dist.get_rank() == 0:
        rest = [name for name in checkpoint_files(path) if name not in files]
        files = dict(sorted({**files, **digest_files(path, names=rest)}.items()))
    _complete(cfg, path, record, files, protect)


class _BackgroundWriteFailed(RuntimeError):
    def __init__(self, message: str, enospc: bool):
        super().__init__(message)
        self.enospc = enospc


def _background_failure(cfg: RunConfig, path: Path, err: BaseException) -> "SaveError":
    """A background save that failed (on every rank): its directory is removed and a
    ``SaveError`` names the cause; ``latest`` still names the previous checkpoint."""
    root = path.parent
    full = getattr(err, "enospc", False) or _out_of_space(err, root)
    async_save.remove_partial(path)
    if full:
        return SaveError(_disk_full_message(cfg, path, root), reason="disk_full")
    why = " ".join(f"{type(err).__name__}: {err}".split())[:500]
    return SaveError(f"the background save of {path.name} failed ({why}): its directory was "
                     f"removed and 'latest' still names the previous checkpoint. Fix the cause, "
                     f"or set checkpoint.async_save=false to see it at the save itself, then "
                     f"resubmit to resume", reason="save_failed")


class SaveError(RuntimeError):
    """A save that could not complete; the previous checkpoint and ``latest`` are untouched.
    ``str()`` is one line naming the cause and the fix; ``reason`` goes to exit_status.json."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _out_of_space(err: BaseException, root: Path) -> bool:
    """Whether a failed write ran out of disk: ENOSPC anywhere in the exception chain (torch's
    writer reports it as a RuntimeError about file positions), or a disk that is now full."""
    seen = err
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) \
                or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(root).free < (64 << 20)
    except OSError:
        return False


def _disk_full_message(cfg: RunConfig, path: Path, root: Path) -> str:
    try:
        free = f"{shutil.disk_usage(root).free / 2**30:.2f} GiB free"
    except OSError:
        free = "free space unknown"
    previous = [p for _, p in step_dirs(root) if is_complete(p)]
    need = ""
    if previous:
        size = sum(f.stat().st_size for f in previous[-1].rglob("*") if f.is_file())
        need = f"; a checkpoint takes {size / 2**30:.2f} GiB ({previous[-1].name})"
    return (f"no space left on the device of {root} ({free}{need}) while saving {path.name}: "
            f"the partial save was removed and 'latest' still names the previous checkpoint. "
            f"Free space there, lower checkpoint.keep_last, or set checkpoint.dir to a larger "
            f"file system, then resubmit to resume")


def _gather_digests(path: Path, written: dict) -> dict:
    """Sizes and CRC32s of every file of step directory ``path``: those each rank took while
    writing (``written``, ``write_digests.py``), and the rest checksummed in parallel, each rank
    reading its share (``saved.digest_files``)."""
    world = dist.get_world_size()
    shares = [None] * world
    dist.all_gather_object(shares, written)
    known = {name: digest for share in shares for name, digest in share.items()}
    rest = [name for name in checkpoint_files(path) if name not in known]
    shares = [None] * world
    dist.all_gather_object(shares, digest_files(path, (dist.get_rank(), world), names=rest))
    return dict(sorted({name: digest for share in [known, *shares]
                        for name, digest in share.items()}.items()))


def verified_on_all_ranks(saved: SavedCheckpoint) -> Optional[DamagedCheckpointError]:
    """Check the files of ``saved`` against its record, each rank its share; the verdict (with
    every rank's findings) is the same on all ranks. None when intact."""
    share = (dist.get_rank(), dist.get_world_size())
    problems = verify_files(saved.path, record_files(saved.record), share)
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, problems)
    everything = [p for rank in found for p in rank]
    return damaged(saved.path, everything, "checkpoint.load") if everything else None


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


def _prune(root: Path, keep_last: int, keep: Path, protect: Optional[Path] = None) -> None:
    """Keep the newest ``keep_last`` complete checkpoints, ``keep`` (the one ``latest`` names)
    and ``protect``; remove older complete ones and incomplete leftovers of crashed saves.

    Each is first renamed to ``<name>.deleting`` (one atomic step: it is never half a
    checkpoint under its own name), then deleted by a background thread, so training does not
    wait for the file system to free it (seconds for gigabytes; a 10B-A1B checkpoint is 145 GB).
    A ``.deleting`` directory left by a killed process is deleted at the next save's pruning."""
    dirs = step_dirs(root)
    complete = [p for _, p in dirs if is_complete(p)]
    doomed = [p for _, p in dirs if not is_complete(p) and p != keep]
    if keep_last > 0:
        doomed += [p for p in complete[:-keep_last] if p not in (keep, protect)]
    condemned = sorted(root.glob(f"step_*{DELETING}"))  # left by a killed process
    for i, old in enumerate(doomed):
        tomb = old.with_name(old.name + DELETING)
        try:
            os.replace(old, tomb)
            condemned.append(tomb)
        except OSError:  # e.g. a leftover of the same name: delete in place
            shutil.rmtree(old, ignore_errors=True)
        if i == 0:
            kill_if("prune:after_first_delete", int(STEP_DIR.match(keep.name).group(1)))
    if condemned:
        _REMOVALS.start(condemned)


DELETING = ".deleting"


class _Removals:
    """One background thread deleting pruned checkpoints (as torchtitan's purge thread); the
    next prune and the end of the run (``wait_for_removals``) wait for it."""

    def __init__(self):
        self.thread: Optional[threading.Thread] = None

    def start(self, paths: list[Path]) -> None:
        self.wait()
        self.thread = threading.Thread(
            target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in paths],
            name="checkpoint-removal", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None


_REMOVALS = _Removals()
wait_for_removals = _REMOVALS.wait


# --------------------------------------------------------------------------------- loading
def load_checkpoint(saved: SavedCheckpoint, cfg: RunConfig, model_chunks,
                    optimizer: TrainingOptimizer, *, rebuild_schedule: bool = False) -> TrainState:
    """Restore model, optimizer, LR schedule and RNG in place; return the saved train state.

    With ``checkpoint.load_optimizer: false`` the Adam moments start fresh (the step, the data
    position and the LR schedule still continue): for loading across layouts whose optimizer
    state megatron cannot reshard (e.g. a different expert-parallel size). ``rebuild_schedule``:
    the LR schedule is the recipe's, not the saved one (``TrainingOptimizer.load``).
    """
    from megatron.core import dist_checkpointing

    path, with_optimizer = saved.path, cfg.checkpoint.load_optimizer
    if with_optimizer:
        optimizer.prepare_load()
    state = _sharded_state_dict(model_chunks, optimizer, TrainState(), cfg, is_loading=True,
                                with_optimizer=with_optimizer)
    saved_layout = (saved.saved_layout["pp"], saved.saved_layout["tp"])
    if saved_layout != _current_layout():
        log.warning("checkpoint %s was written with (PP, TP)=%s, this run has %s: RNG states are "
                    "not restored", path, saved_layout, _current_layout())
        state.pop("rng_state")
    written_by, running = saved.megatron_core, str(mcore.installed())
    if written_by not in (None, running):
        log.info("checkpoint %s was written by megatron-core %s; loading it with %s", path,
                 written_by, running)
    try:
        with torch.no_grad():  # the distributed optimizer copies into views of the fp32 weights
            loaded = dist_checkpointing.load(state, str(path))
            for key, chunk in zip(model_keys(len(model_chunks)), model_chunks):
                chunk.load_state_dict(loaded[key])
        optimizer.load(loaded["optimizer"] if with_optimizer else None, loaded["scheduler"],
                       rebuild_schedule=rebuild_schedule)
    except load_errors() as err:
        why = f"{type(err).__name__}: {str(err)[:300]}"
        if written_by in (None, running):
            raise CheckpointError(
                f"cannot load {path} ({why}): its files are damaged, or it holds another model "
                f"than this recipe describes; use an earlier checkpoint, or compare the recipe "
                f"with {path}/run_config.yaml", key="checkpoint.load", value=str(path)) from err
        raise CheckpointError(
            f"{path} was written by megatron-core {written_by} and megatron-core {running} "
            f"cannot load it ({why}); resume it with megatron-core {written_by}",
            key="checkpoint.load", value=str(path)) from None
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return TrainState(**loaded["train_state"])


def _current_layout() -> tuple[int, int]:
    from megatron.core import parallel_state

    return (parallel_state.get_pipeline_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_world_size())
