"""A checkpoint on disk: find it, check it, and read what it says about itself.

The one reader of megatron-tst checkpoints, used by resume (``training/checkpoint.py``), ``eval``,
``export`` and ``inspect``. ``open_checkpoint(target)`` takes a ``step_*`` directory or a
checkpoint root, refuses anything that is not a complete checkpoint of a format and a
megatron-core line this installation reads (one ``CheckpointError`` naming the fix), and reads the
completion record and the common state (stored run config, train state, LR schedule) once,
without loading any tensor. Every file a crash or a user can damage is read defensively.

Layout of a checkpoint root::

    latest                  name of the newest complete checkpoint (written last, atomically)
    step_0000100/           one megatron dist checkpoint (model, optimizer, schedule, state)
        run_config.yaml     the resolved run config, human-readable
        checkpoint.json     the completion record: a directory without it is never loaded
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_tst import mcore
from megatron_tst.config.errors import InputError

log = logging.getLogger(__name__)

LATEST = "latest"
RECORD = "checkpoint.json"  # completion record, written last inside a step directory
FORMAT_VERSION = 1  # bump when the saved state's layout changes incompatibly
STEP_DIR = re.compile(r"^step_(\d+)$")
EMBEDDING_KEY = "embedding.word_embeddings.weight"


class CheckpointError(InputError):
    """The path is not a checkpoint this megatron-tst can read (missing, incomplete, damaged,
    unknown format, another megatron-core line), or its tokenizer cannot be found."""

    kind = "checkpoint error"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def model_keys(num_chunks: int) -> list[str]:
    """The checkpoint keys of a rank's model chunks (one per virtual pipeline stage)."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def is_complete(path: Path) -> bool:
    return (Path(path) / RECORD).is_file()


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every step_* directory under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir()
                  if p.is_dir() and (m := STEP_DIR.match(p.name)))


def read_record(path: Path) -> dict:
    """The completion record of step directory ``path`` ({} when missing or unreadable)."""
    try:
        record = json.loads((Path(path) / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def saved_megatron_core(path: Path) -> Optional[str]:
    """The megatron-core version recorded in a checkpoint's completion record (None: older
    checkpoints, which did not record it, or a damaged record)."""
    version = read_record(path).get("megatron_core")
    return version if isinstance(version, str) else None


def latest_checkpoint(ckpt_dir: str | Path, key: Optional[str] = None) -> Optional[Path]:
    """The checkpoint to resume from in a checkpoint root: the one ``latest`` names, or (no
    ``latest`` yet: the first save was interrupted after completing) the newest complete one.
    None when there is none. Newer directories that are skipped are named in a warning."""
    root = Path(ckpt_dir)
    marker = root / LATEST
    dirs = step_dirs(root)
    if marker.is_file():
        try:
            name = marker.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{marker} cannot be read ({err}); delete it to resume from the "
                                  f"newest complete step_* directory", key=key,
                                  value=str(root)) from None
        path = root / name
        if not name or not STEP_DIR.match(name) or not path.is_dir():
            raise CheckpointError(f"{marker} names {name!r}, which is not a step_* directory "
                                  f"here; point checkpoint.load at an existing step_* directory, "
                                  f"or delete {marker} to resume from the newest complete one",
                                  key=key, value=str(root))
    else:
        complete = [p for _, p in dirs if is_complete(p)]
        path = complete[-1] if complete else None
        if path is not None:
            log.warning("%s has no '%s' file (a save was interrupted before writing it): "
                        "resuming from the newest complete checkpoint, %s", root, LATEST, path.name)
    named = int(STEP_DIR.match(path.name).group(1)) if path is not None else -1
    for step, other in dirs:
        if step > named:
            why = ("complete but not named by 'latest' (the save was interrupted before "
                   f"updating it): set checkpoint.load={other} to resume from it instead"
                   if is_complete(other) else "incomplete (a save was interrupted)")
            log.warning("skipping %s: %s; resuming from %s", other, why,
                        path.name if path else "scratch")
    return path


def is_root(path: Path) -> bool:
    """Whether ``path`` is a checkpoint root (holds ``latest`` or step_* directories) rather
    than one checkpoint."""
    return (path / LATEST).is_file() or (not (path / "metadata.json").is_file()
                                         and bool(step_dirs(path)))


def find_checkpoint(target: str | Path, key: Optional[str] = None) -> Path:
    """The step directory ``target`` names: itself, or the newest complete one of a checkpoint
    root, checked complete, of a known format and readable by this megatron-core. ``key`` is
    the recipe key or option the path came from (named in errors)."""
    path = Path(target)
    given = "give a checkpoint step_* directory or a checkpoint root (e.g. runs/NAME/checkpoints)"

    def fail(message: str) -> CheckpointError:
        return CheckpointError(message, key=key, value=str(target))

    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise fail(f"{path} does not exist{where}; {given}")
    if not path.is_dir():
        raise fail(f"{path} is a file, not a checkpoint directory; {given}")
    if is_root(path):
        found = latest_checkpoint(path, key)
        if found is None:
            raise fail(f"{path} holds no complete checkpoint (every step_* directory in it is "
                       f"from an interrupted save)")
        path = found
    if not (path / "metadata.json").is_file():
        hint = (f"; it looks like a run directory: give {path / 'checkpoints'}"
                if (path / "checkpoints").is_dir() else "")
        raise fail(f"{path} is not a megatron dist checkpoint (no metadata.json); {given}{hint}")
    if not is_complete(path):
        raise fail(f"{path} is not a complete megatron-tst checkpoint (no {RECORD}): its save was "
                   f"interrupted, or another program wrote it. Use an earlier step_* directory, "
                   f"or the checkpoint root (its 'latest' names the newest complete one)")
    version = read_record(path).get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) \
            or not 1 <= version <= FORMAT_VERSION:
        raise fail(f"{path} has checkpoint format {version!r} ({path / RECORD}); this "
                   f"megatron-tst reads format {FORMAT_VERSION}"
                   f"{' and older' if FORMAT_VERSION > 1 else ''}. Use the megatron-tst version "
                   f"that wrote it (see run_config.yaml beside it), or start fresh with "
                   f"checkpoint.load=none")
    if why := mcore.unreadable_checkpoint(saved_megatron_core(path)):
        raise fail(f"cannot load {path}: {why}")
    return path


@dataclass
class SavedCheckpoint:
    """What a checkpoint says about itself, read without loading the model."""

    path: Path
    run_config: dict  # the resolved RunConfig of the run that wrote it, as a plain dict
    train_state: dict  # TrainState as a dict: step, phase, bag_size, data_chunk, vocab_size, ...
    scheduler: dict = field(default_factory=dict)  # the LR scheduler's state
    record: dict = field(default_factory=dict)  # checkpoint.json

    @property
    def step(self) -> int:
        return int(self.train_state.get("step", 0))

    @property
    def phase(self) -> str:
        return str(self.train_state.get("phase") or "")

    @property
    def megatron_core(self) -> Optional[str]:
        version = self.record.get("megatron_core")
        return version if isinstance(version, str) else None

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


def open_checkpoint(target: str | Path, key: Optional[str] = None) -> SavedCheckpoint:
    """Find and check ``target`` (``find_checkpoint``) and read its record and common state."""
    from megatron.core import dist_checkpointing

    path = find_checkpoint(target, key)
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as err:  # megatron raises several kinds for unreadable files
        raise CheckpointError(f"cannot read the common state of {path} ({type(err).__name__}: "
                              f"{str(err)[:300]}); the checkpoint is damaged or was not written "
                              f"by megatron-tst", key=key, value=str(target)) from None
    if not isinstance(common, dict) or not isinstance(common.get("run_config"), dict) \
            or not isinstance(common.get("train_state"), dict):
        raise CheckpointError(f"{path} is a megatron dist checkpoint without megatron-tst's run "
                              f"config and train state: it was not written by megatron-tst",
                              key=key, value=str(target))
    scheduler = common.get("scheduler")
    return SavedCheckpoint(path, common["run_config"], common["train_state"],
                           scheduler if isinstance(scheduler, dict) else {}, read_record(path))
