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
import zlib
from concurrent.futures import ThreadPoolExecutor
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


def load_errors() -> tuple:
    """What reading a damaged dist checkpoint raises: any Exception, and torch's
    ``CheckpointException``, which derives from ``BaseException`` (a missing shard file)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


class DamagedCheckpointError(CheckpointError):
    """A complete checkpoint whose files are not as they were written: a file missing, cut,
    changed (its size or CRC32 differs from the completion record) or unreadable. A resume
    with checkpoint.load=auto falls back to the newest intact checkpoint."""


# ------------------------------------------------------------------------------- integrity
READ_BYTES = 16 << 20  # per read while checksumming
CHECKSUM_THREADS = 8  # zlib releases the GIL: files are checksummed in parallel


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(READ_BYTES):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _share(names, share: tuple[int, int]) -> list[str]:
    rank, world = share
    return sorted(names)[rank::world]


def checkpoint_files(step_dir: Path) -> list[str]:
    """The files of a step directory (relative paths), as the completion record lists them."""
    return sorted(str(p.relative_to(step_dir)) for p in Path(step_dir).rglob("*")
                  if p.is_file() and p.name not in (RECORD, "run_config.yaml"))


def digest_files(step_dir: Path, share: tuple[int, int] = (0, 1),
                 names: Optional[list[str]] = None) -> dict:
    """{relative path: {"size", "crc32"}} of this rank's share (``(rank, world)``) of the files
    (of ``names`` if given, else of all of them)."""
    step_dir = Path(step_dir)
    mine = _share(checkpoint_files(step_dir) if names is None else names, share)
    with ThreadPoolExecutor(CHECKSUM_THREADS) as pool:
        crcs = list(pool.map(lambda name: _crc32(step_dir / name), mine))
    return {name: {"size": (step_dir / name).stat().st_size, "crc32": crc}
            for name, crc in zip(mine, crcs)}


def verify_files(step_dir: Path, expected: dict, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What differs from the record in this rank's share of the files (sizes first: a cut file
    costs no read); [] when intact."""
    step_dir = Path(step_dir)

    def check(name: str) -> Optional[str]:
        want, path = expected[name], step_dir / name
        try:
            size = path.stat().st_size
            if size != want.get("size"):
                return f"{name} has {size} bytes, {want.get('size')} were written"
            if _crc32(path) != want.get("crc32"):
                return f"{name} has changed since it was written (CRC32 differs)"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
        return None

    with ThreadPoolExecutor(CHECKSUM_THREADS) as pool:
        return [p for p in pool.map(check, _share(expected, share)) if p]


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


def _marker(root: Path) -> Optional[str]:
    """The step directory ``latest`` names, or None with a warning when the file is unreadable,
    not text, or names no step directory here (then it is treated as missing)."""
    marker = root / LATEST
    try:
        name = marker.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        why = f"cannot be read as text ({err})"
    else:
        if STEP_DIR.match(name) and (root / name).is_dir():
            return name
        why = f"names {name[:60]!r}, which is not a step_* directory here"
    log.warning("%s %s: ignoring it and resuming from the newest complete checkpoint", marker, why)
    return None


def latest_checkpoint(ckpt_dir: str | Path) -> Optional[Path]:
    """The checkpoint to resume from in a checkpoint root: the one ``latest`` names, or (no
    usable ``latest``: the first save was interrupted after completing, or the file is damaged)
    the newest complete one. None when there is none. Newer directories that are skipped are
    named in a warning."""
    root = Path(ckpt_dir)
    dirs = step_dirs(root)
    name = _marker(root) if (root / LATEST).is_file() else None
    if name is not None:
        path = root / name
    else:
        complete = [p for _, p in dirs if is_complete(p)]
        path = complete[-1] if complete else None
        if path is not None and not (root / LATEST).is_file():
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
        found = latest_checkpoint(path)
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
    if not read_record(path):
        raise DamagedCheckpointError(
            f"{path / RECORD} is damaged (not a JSON object): the completion record cannot say "
            f"what the checkpoint holds; use an earlier checkpoint", key=key, value=str(target))
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

    def check_tokenizer(self, entries: int, name: str) -> None:
        """Refuse a tokenizer of another size than the run's: its ids would name other tokens
        than the model learnt (``entries``: its vocabulary size)."""
        data = self.run_config.get("data", {})
        expected = self.train_state.get("tokenizer_vocab") or (
            data.get("demo_vocab_size") if data.get("source") == "demo" else None) or (
            self.train_state.get("vocab_size") if not self.run_config.get("model", {}).get(
                "vocab_size") else None)
        if isinstance(expected, int) and expected and expected != entries:
            raise CheckpointError(
                f"the tokenizer {name} has {entries:,} entries, the run that wrote {self.path} "
                f"used one of {expected:,}: it is not the run's tokenizer (ids would decode to "
                f"other tokens); pass the run's tokenizer with --tokenizer PATH")

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


def open_checkpoint(target: str | Path, key: Optional[str] = None, *,
                    verify: bool = True) -> SavedCheckpoint:
    """Find and check ``target`` (``find_checkpoint``), verify its files against the sizes and
    CRC32s of its completion record (``verify``; the trainer verifies on all ranks instead, see
    ``training/checkpoint.py``), and read its record and common state."""
    from megatron.core import dist_checkpointing

    path = find_checkpoint(target, key)
    record = read_record(path)
    if verify and (problems := verify_files(path, record_files(record))):
        raise damaged(path, problems, key, target)
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except load_errors() as err:  # megatron and torch raise several kinds for unreadable files
        raise DamagedCheckpointError(
            f"cannot read the common state of {path} ({type(err).__name__}: {str(err)[:300]}); "
            f"the checkpoint is damaged or was not written by megatron-tst", key=key,
            value=str(target)) from None
    if not isinstance(common, dict) or not isinstance(common.get("run_config"), dict) \
            or not isinstance(common.get("train_state"), dict):
        raise CheckpointError(f"{path} is a megatron dist checkpoint without megatron-tst's run "
                              f"config and train state: it was not written by megatron-tst",
                              key=key, value=str(target))
    scheduler = common.get("scheduler")
    return SavedCheckpoint(path, common["run_config"], common["train_state"],
                           scheduler if isinstance(scheduler, dict) else {}, record)


def record_files(record: dict) -> dict:
    """The files a completion record lists ({} for checkpoints saved before it did)."""
    files = record.get("files")
    return files if isinstance(files, dict) and all(isinstance(v, dict) for v in files.values()) \
        else {}


def damaged(path: Path, problems: list[str], key: Optional[str] = None,
            target=None) -> DamagedCheckpointError:
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3
                                        else "")
    return DamagedCheckpointError(
        f"{path} is damaged: {shown}. Its files are not as they were saved (a disk or copy "
        f"error, or an edit); use an earlier checkpoint", key=key,
        value=str(target if target is not None else path))
