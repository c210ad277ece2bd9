"""Sharded, parallel, resumable preprocessing: ``megatron-tst preprocess --output-dir DIR``.

Every input source (a file; one ``.arrow`` file of a Hugging Face dataset) becomes one indexed
dataset, or one per ``shard_documents`` documents. The layout of ``DIR``::

    preprocess.json                        settings, written once every check has passed
    shards/<name>_text_document.{bin,idx}  a shard's training documents (no files when it has none)
    shards/<name>_text_document.valid.{bin,idx}  its held-out documents, if any
    shards/<name>_text_document.json       the shard's record: written last, so it marks a
                                           complete shard
    valid_text_document.{bin,idx}          all held-out documents (written by the merge)
    manifest.json                          every shard, written last (megatron_tst.data.manifest)

(with ``shard_documents``, a source's shards are ``shards/<name>/00000_text_document`` ...).

**Resuming.** A shard counts as done when its record exists and names the same source (size and
modification time) and the same settings. A re-run skips done shards (a source whose shards are
all done is not even opened), and writes the others through temporary files renamed into place
before the record: after SIGINT or SIGKILL no partial shard is ever recorded, so none is listed.
A source that changed since its shards were written is tokenized again.

**Many machines.** ``num_shards`` / ``shard_index`` (default: ``SLURM_ARRAY_TASK_COUNT`` /
``SLURM_ARRAY_TASK_ID``) give task ``I`` of ``K`` the sources ``I, I+K, I+2K, ...`` of the sorted
list. Each task checks the whole input list and the settings, processes its sources, and writes the
manifest when it finds every shard of every source done (so the last task to finish writes it);
``--merge`` only checks that and writes the manifest.

**Workers.** ``workers`` processes take whole sources; a shard is the same bytes whichever worker
makes it, so the output does not depend on ``workers`` (nor on ``num_shards``).

**Held-out split.** A document is held out when ``document_hash(text) < threshold``: the 64-bit
BLAKE2b hash of its UTF-8 text, so the split does not depend on order, sharding or workers, and
identical documents fall on the same side. ``valid_fraction F`` sets ``threshold = F * 2**64``;
``valid_documents N`` reads every source once more before tokenizing (no tokenization: a small
fraction of the time tokenizing takes) to find the N smallest hashes.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import heapq
import itertools
import json
import multiprocessing
import os
import queue as queue_module
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_tst.data.errors import DataError
from megatron_tst.data.manifest import (SETTINGS_NAME, Manifest, ShardEntry, SourceFile,
                                        TokenizerInfo, ValidEntry, write_json_atomic,
                                        write_manifest)
from megatron_tst.data.preprocess import (_encode_batch_with, _pool_context, _resolve_tokenizer,
                                          _token_dtype)
from megatron_tst.data.sources import (DocumentCounter, ExpandedInputs, Source, expand_inputs,
                                       read_documents)

__all__ = ["ShardedResult", "document_hash", "preprocess_sharded", "task_from_environment"]

SETTINGS_FORMAT = "megatron-tst-preprocess-settings"
SHARDS_DIR = "shards"
SUFFIX = "_text_document"
VALID_NAME = "valid" + SUFFIX
_BATCH_DOCUMENTS = 64  # documents per tokenizer call, at most ...
_BATCH_CHARACTERS = 1 << 20  # ... and about this many characters: bounded memory per call
_HASH_SPACE = 1 << 64


def document_hash(text: str) -> int:
    """The 64-bit BLAKE2b hash of a document's UTF-8 text, as an unsigned integer."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def task_from_environment(num_shards: Optional[int], shard_index: Optional[int],
                          environ: Optional[dict] = None) -> tuple[int, int]:
    """(num_shards, shard_index): the arguments, else a Slurm array task's, else (1, 0)."""
    env = os.environ if environ is None else environ
    if num_shards is None and shard_index is None and "SLURM_ARRAY_TASK_ID" in env:
        try:
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
            index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        except (KeyError, ValueError):
            raise DataError("this Slurm array task has no usable SLURM_ARRAY_TASK_COUNT / "
                            "SLURM_ARRAY_TASK_ID; pass --num-shards K --shard-index I") from None
        num_shards, shard_index = count, index
    if num_shards is None and shard_index is None:
        return 1, 0
    if num_shards is None or shard_index is None:
        raise DataError("--num-shards and --shard-index go together: pass both (task I of K)")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise DataError(f"--shard-index {shard_index} is not a task of --num-shards {num_shards}: "
                        f"tasks are numbered 0 to {num_shards - 1}")
    return num_shards, shard_index


# ------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """What every shard of a directory must have been made with."""

    tokenizer: TokenizerInfo
    text_key: str
    shard_documents: Optional[int]
    valid_rule: Optional[str]  # "fraction" | "documents" | None
    valid_value: Optional[float]
    valid_threshold: Optional[int]  # held out iff document_hash(text) < valid_threshold
    inputs_digest: Optional[str] = None  # the sources' names and sizes (valid_documents only)

    def to_json(self) -> dict:
        return {"format": SETTINGS_FORMAT, "version": 1, **asdict(self)}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    def differences(self, other: dict, ignore: Sequence[str] = ()) -> list[str]:
        mine = self.to_json()
        return [k for k in mine if k not in ("inputs_digest", *ignore) and mine[k] != other.get(k)]


_SETTING_FLAGS = {"tokenizer": "--hf-tokenizer / --tokenizer-model", "text_key": "--text-key",
                  "shard_documents": "--shard-documents",
                  "valid_rule": "--valid-fraction / --valid-documents",
                  "valid_value": "--valid-fraction / --valid-documents",
                  "valid_threshold": "--valid-fraction / --valid-documents",
                  "format": "(an older megatron-tst)", "version": "(an older megatron-tst)"}


def _read_json(path: Path) -> Optional[dict]:
    """A small JSON object, or None when the file is missing or damaged (a crash can leave
    neither: they are written atomically, but a user can)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 20).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _check_settings(out_dir: Path, settings: Settings, ignore: Sequence[str] = ()) -> None:
    path = out_dir / SETTINGS_NAME
    if not path.exists():
        return
    stored = _read_json(path)
    if stored is None or stored.get("format") != SETTINGS_FORMAT:
        raise DataError(f"{path} is damaged (not a settings file of megatron-tst preprocess); "
                        f"{out_dir} cannot be resumed safely: use a new --output-dir, or delete "
                        f"{out_dir} to start again")
    diff = settings.differences(stored, ignore)
    if diff:
        what = "; ".join(f"{k}: {json.dumps(stored.get(k))[:120]} there, "
                         f"{json.dumps(settings.to_json()[k])[:120]} now ({_SETTING_FLAGS[k]})"
                         for k in diff)
        raise DataError(f"{out_dir} was started with other settings ({what}). Shards made with "
                        f"different settings must not be mixed: run with the settings of "
                        f"{path}, or use a new --output-dir")
    if (settings.valid_rule == "documents" and stored.get("inputs_digest")
            and stored["inputs_digest"] != settings.inputs_digest):
        raise DataError(f"the inputs differ from those {out_dir} was started with, and "
                        f"--valid-documents chose its held-out documents among those: use a new "
                        f"--output-dir (or --valid-fraction, which decides each document alone)")


# ------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class ShardPaths:
    out_dir: Path
    prefix: str  # relative to out_dir

    @property
    def path(self) -> Path:
        return self.out_dir / self.prefix

    def file(self, suffix: str) -> Path:
        return Path(f"{self.path}{suffix}")

    @property
    def record(self) -> Path:
        return self.file(".json")


def shard_paths(out_dir: Path, source: Source, chunk: int, chunked: bool) -> ShardPaths:
    name = f"{source.name}/{chunk:05d}" if chunked else source.name
    return ShardPaths(out_dir, f"{SHARDS_DIR}/{name}{SUFFIX}")


def _read_records(out_dir: Path, source: Source, settings: Settings) -> tuple[list[dict], bool]:
    """(the source's done shards in chunk order, whether they are all of them). Records of
    another version of the source or of other settings make the source start again."""
    chunked = settings.shard_documents is not None
    stat = SourceFile.of(source.path)
    records = []
    for chunk in itertools.count():
        paths = shard_paths(out_dir, source, chunk, chunked)
        record = _read_json(paths.record)
        if record is None:
            break
        if (record.get("settings") != settings.digest or record.get("chunk") != chunk
                or (record.get("source") or {}).get("size") != stat.size
                or (record.get("source") or {}).get("mtime_ns") != stat.mtime_ns
                or not _record_files_exist(paths, record)):
            return [], False
        records.append(record)
        if record.get("last") is True or not chunked:
            return records, record.get("last") is True
    return records, False


def _record_files_exist(paths: ShardPaths, record: dict) -> bool:
    needed = ([".bin", ".idx"] if record.get("documents") else []) + \
             ([".valid.bin", ".valid.idx"] if record.get("valid_documents") else [])
    return all(paths.file(s).is_file() for s in needed)


# ------------------------------------------------------------------------------------ workers
@dataclass(frozen=True)
class _Job:
    source: Source
    out_dir: Path
    settings: Settings
    text_key: str


_STATE: dict = {}


def _worker_init(spec: Any, dtype: Any, events: Any) -> None:
    _STATE.update(tokenizer=spec.load() if hasattr(spec, "load") else spec, dtype=dtype,
                  emit=events.put if events is not None else None)


def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise DataError(f"another preprocess is writing the shards of this source (lock {path} "
                        f"is held): wait for it to finish, or stop it, then run again") from None
    return handle


def _peekable(iterator: Iterator[str]):
    first = list(itertools.islice(iterator, 1))
    return (itertools.chain(first, iterator), bool(first))


def _process_source(job: _Job) -> dict:
    """Make the missing shards of one source; returns a summary event."""
    emit, tokenizer, dtype = _STATE["emit"], _STATE["tokenizer"], _STATE["dtype"]
    settings, source, out_dir = job.settings, job.source, job.out_dir
    chunked = settings.shard_documents is not None
    first = shard_paths(out_dir, source, 0, chunked)
    lock = _lock(first.path.parent / f".{first.path.name}.lock")
    try:
        records, complete = _read_records(out_dir, source, settings)
        if complete:
            return {"source": str(source.path), "skipped_shards": len(records), "written": 0,
                    "documents": 0, "tokens": 0}
        stat = SourceFile.of(source.path)
        counter = DocumentCounter()
        documents = read_documents(source, job.text_key, counter)
        written = docs_total = tokens_total = 0
        for chunk in itertools.count():
            limit = settings.shard_documents
            if chunk < len(records):  # done already: read past its documents
                for _ in itertools.islice(documents, limit):
                    pass
                continue
            paths = shard_paths(out_dir, source, chunk, chunked)
            skipped_before = counter.skipped
            batch_iter = itertools.islice(documents, limit) if chunked else documents
            record = _write_shard(paths, batch_iter, tokenizer, dtype, settings, emit)
            documents, more = _peekable(documents) if chunked else (documents, False)
            record.update(chunk=chunk, last=not more, source=asdict(stat),
                          skipped=counter.skipped - skipped_before, settings=settings.digest)
            write_json_atomic(paths.record, record)
            written += 1
            docs_total += record["documents"] + record["valid_documents"]
            tokens_total += record["tokens"] + record["valid_tokens"]
            if emit:
                emit(("shard", paths.prefix, record))
            if not more:
                break
        return {"source": str(source.path), "skipped_shards": len(records), "written": written,
                "documents": docs_total, "tokens": tokens_total}
    finally:
        lock.close()


def _write_shard(paths: ShardPaths, documents: Iterator[str], tokenizer: Any, dtype: Any,
                 settings: Settings, emit: Optional[Callable]) -> dict:
    """Tokenize ``documents`` into the shard's files (temporary names, renamed when whole)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    paths.path.parent.mkdir(parents=True, exist_ok=True)
    for stale in paths.path.parent.glob(f".{paths.path.name}.*tmp*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    tmp = {part: paths.path.with_name(f".{paths.path.name}{part}.tmp{os.getpid()}")
           for part in ("", ".valid")}
    builders: dict[str, Any] = {}
    counts = {"": [0, 0], ".valid": [0, 0]}
    threshold = settings.valid_threshold
    try:
        for batch in _batches(documents):
            arrays = _encode_batch_with(tokenizer, dtype, batch)
            for text, array in zip(batch, arrays):
                part = ".valid" if threshold is not None and document_hash(text) < threshold else ""
                if part not in builders:
                    builders[part] = IndexedDatasetBuilder(f"{tmp[part]}.bin", dtype=dtype)
                builders[part].add_document(array, [array.size])
                counts[part][0] += 1
                counts[part][1] += int(array.size)
            if emit:
                emit(("progress", len(batch), sum(int(a.size) for a in arrays)))
        for part, builder in builders.items():
            builder.finalize(f"{tmp[part]}.idx")
            for suffix in (".bin", ".idx"):
                with open(f"{tmp[part]}{suffix}", "rb+") as f:
                    os.fsync(f.fileno())
        for part in ("", ".valid"):
            for suffix in (".bin", ".idx"):
                final = paths.file(f"{part}{suffix}")
                if part in builders:
                    os.replace(f"{tmp[part]}{suffix}", final)
                else:
                    final.unlink(missing_ok=True)  # of an earlier version of this shard
    finally:
        for part in tmp:
            for suffix in (".bin", ".idx"):
                Path(f"{tmp[part]}{suffix}").unlink(missing_ok=True)
    return {"prefix": paths.prefix, "documents": counts[""][0], "tokens": counts[""][1],
            "valid_documents": counts[".valid"][0], "valid_tokens": counts[".valid"][1]}


def _batches(documents: Iterator[str]) -> Iterator[list[str]]:
    """Consecutive documents, :data:`_BATCH_DOCUMENTS` at a time or fewer when they reach
    :data:`_BATCH_CHARACTERS`."""
    batch: list[str] = []
    size = 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if len(batch) == _BATCH_DOCUMENTS or size >= _BATCH_CHARACTERS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _smallest_hashes(job: tuple[Source, str, int]) -> list[int]:
    """The ``n`` smallest document hashes of one source, sorted (the valid_documents pre-pass)."""
    source, text_key, n = job
    return heapq.nsmallest(n, (document_hash(t) for t in read_documents(source, text_key)))


# -------------------------------------------------------------------------------------- merge
def _complete_records(out_dir: Path, sources: Sequence[Source], settings: Settings):
    """(every source's records in order, the sources that are not done)."""
    all_records, missing = [], []
    for source in sources:
        records, complete = _read_records(out_dir, source, settings)
        if complete:
            all_records.extend(records)
        else:
            missing.append(source)
    return all_records, missing


def _missing_message(out_dir: Path, missing: Sequence[Source], total: int) -> str:
    names = ", ".join(str(s.path) for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
    return (f"{len(missing)} of {total} sources have no finished shards in {out_dir} yet "
            f"({names}): run the preprocess tasks again (finished shards are skipped), then "
            f"--merge")


def merge(out_dir: Path, sources: Sequence[Source], settings: Settings,
          records: Sequence[dict]) -> Manifest:
    """Write ``valid_text_document`` (the held-out parts of all shards) and ``manifest.json``."""
    valid = None
    held_out = [r for r in records if r["valid_documents"]]
    if settings.valid_rule is not None:
        if not held_out:
            raise DataError(f"no document of the inputs was held out for validation "
                            f"({settings.valid_rule} {settings.valid_value}): raise "
                            f"--valid-fraction / --valid-documents")
        _concatenate(out_dir / VALID_NAME, [out_dir / f"{r['prefix']}.valid" for r in held_out],
                     settings)
        valid = ValidEntry(prefix=VALID_NAME, rule=settings.valid_rule,
                           value=settings.valid_value,
                           documents=sum(r["valid_documents"] for r in held_out),
                           tokens=sum(r["valid_tokens"] for r in held_out))
    shards = tuple(
        ShardEntry(prefix=r["prefix"], source=SourceFile(**r["source"]), chunk=r["chunk"],
                   documents=r["documents"], tokens=r["tokens"], skipped=r["skipped"],
                   valid_documents=r["valid_documents"])
        for r in records if r["documents"])
    if not shards:
        raise DataError("every document of the inputs was held out for validation: lower "
                        "--valid-fraction / --valid-documents")
    manifest = Manifest(tokenizer=settings.tokenizer, text_key=settings.text_key,
                        shard_documents=settings.shard_documents, shards=shards, valid=valid,
                        directory=out_dir)
    write_manifest(out_dir, manifest)
    return manifest


def _concatenate(prefix: Path, parts: Sequence[Path], settings: Settings) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tmp = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    try:
        builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=_token_dtype(settings.tokenizer.vocab_size))
        for part in parts:
            builder.add_index(str(part))
        builder.finalize(f"{tmp}.idx")
        os.replace(f"{tmp}.bin", f"{prefix}.bin")
        os.replace(f"{tmp}.idx", f"{prefix}.idx")
    finally:
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)


# ----------------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class ShardedResult:
    out_dir: Path
    manifest: Optional[Manifest]  # None when other tasks still have sources to do
    sources: int  # sources of this task
    shards_written: int
    shards_skipped: int  # found done
    documents: int  # written by this invocation (held-out ones included)
    tokens: int
    seconds: float
    missing: int = 0  # sources of other tasks not done yet


def _inputs_digest(sources: Sequence[Source]) -> str:
    listing = [(s.name, s.path.stat().st_size) for s in sources]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _valid_threshold(sources, text_key, valid_fraction, valid_documents, workers, out_dir,
                     log) -> Optional[int]:
    if valid_fraction is not None:
        return int(valid_fraction * _HASH_SPACE)
    if valid_documents is None:
        return None
    stored = _read_json(out_dir / SETTINGS_NAME)
    if stored and stored.get("valid_rule") == "documents" and stored.get("valid_value") == \
            valid_documents and isinstance(stored.get("valid_threshold"), int):
        return stored["valid_threshold"]
    log(f"choosing {valid_documents:,} held-out documents: reading {len(sources)} sources once "
        f"(no tokenization)")
    jobs = [(s, text_key, valid_documents) for s in sources]
    if workers > 1 and len(jobs) > 1:
        with _pool_context().Pool(min(workers, len(jobs))) as pool:
            lists = pool.map(_smallest_hashes, jobs, chunksize=1)
    else:
        lists = [_smallest_hashes(j) for j in jobs]
    smallest = heapq.nsmallest(valid_documents, itertools.chain.from_iterable(lists))
    total = sum(len(x) for x in lists)
    if len(smallest) < valid_documents or total <= valid_documents:
        raise DataError(f"--valid-documents {valid_documents:,} asks for at least as many "
                        f"documents as the inputs hold (at most {total:,}); give fewer, or "
                        f"--valid-fraction")
    return smallest[-1] + 1


def preprocess_sharded(
    inputs: Sequence[str | Path] | ExpandedInputs, out_dir: str | Path, tokenizer: Any, *,
    workers: int = 1, text_key: str = "text", shard_documents: Optional[int] = None,
    num_shards: int = 1, shard_index: int = 0, merge_only: bool = False,
    valid_fraction: Optional[float] = None, valid_documents: Optional[int] = None,
    progress: Optional[bool] = None, log: Callable[[str], None] = print,
) -> ShardedResult:
    """Tokenize ``inputs`` into shards under ``out_dir`` (see the module docstring).

    ``tokenizer``: a project tokenizer (``load_tokenizer``) or a ``(kind, path[, options])`` spec.
    Every check that can refuse the run (inputs, tokenizer, settings of an existing directory)
    runs before anything is written. Raises :class:`DataError` for bad input.
    """
    from megatron_tst.data.tokenizer_files import file_sha256

    start = time.monotonic()
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if shard_documents is not None and shard_documents < 1:
        raise DataError(f"--shard-documents must be >= 1, got {shard_documents}")
    if valid_fraction is not None and valid_documents is not None:
        raise DataError("give --valid-fraction or --valid-documents, not both")
    if valid_fraction is not None and not 0 < valid_fraction < 1:
        raise DataError(f"--valid-fraction must be between 0 and 1 (exclusive), got "
                        f"{valid_fraction}")
    if valid_documents is not None and valid_documents < 1:
        raise DataError(f"--valid-documents must be >= 1, got {valid_documents}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--output-dir {out_dir} exists and is not a directory; give a new "
                        f"directory (or one preprocess wrote before, to resume it)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / SETTINGS_NAME).exists():
        raise DataError(f"--output-dir {out_dir} is not empty and was not written by megatron-tst "
                        f"preprocess (no {SETTINGS_NAME}); give a new or empty directory")
    sources = (inputs if isinstance(inputs, ExpandedInputs) else expand_inputs(inputs)).sources
    tok, spec = _resolve_tokenizer(tokenizer, None)
    if spec is None:
        raise DataError("--output-dir needs a tokenizer file (--hf-tokenizer or "
                        "--tokenizer-model): its sha256 goes into the manifest")
    info = TokenizerInfo(kind=spec.kind, path=str(Path(spec.path).resolve()),
                         sha256=file_sha256(spec.path), vocab_size=int(tok.vocab_size),
                         eod=int(tok.eod))
    rule = "fraction" if valid_fraction is not None else (
        "documents" if valid_documents is not None else None)
    value = valid_fraction if valid_fraction is not None else (
        float(valid_documents) if valid_documents is not None else None)
    digest = _inputs_digest(sources) if rule == "documents" else None
    # Refuse a mismatch before the held-out pre-pass, which alone knows valid_documents' threshold.
    _check_settings(out_dir, Settings(info, text_key, shard_documents, rule, value, None, digest),
                    ignore=("valid_threshold",))
    mine = [s for i, s in enumerate(sources) if i % num_shards == shard_index]
    out_dir.mkdir(parents=True, exist_ok=True)
    threshold = _valid_threshold(sources, text_key, valid_fraction, valid_documents, workers,
                                 out_dir, log)
    settings = Settings(info, text_key, shard_documents, rule, value, threshold, digest)
    _check_settings(out_dir, settings)
    if not (out_dir / SETTINGS_NAME).exists():
        write_json_atomic(out_dir / SETTINGS_NAME, settings.to_json())

    written = skipped = documents = tokens = 0
    if not merge_only:
        events = _run_jobs([_Job(s, out_dir, settings, text_key) for s in mine], spec, tok,
                           _token_dtype(tok.vocab_size), workers, progress, log)
        for summary in events:
            written += summary["written"]
            skipped += summary["skipped_shards"]
            documents += summary["documents"]
            tokens += summary["tokens"]
    records, missing = _complete_records(out_dir, sources, settings)
    manifest = None
    if not missing:
        manifest = merge(out_dir, sources, settings, records)
    elif merge_only or num_shards == 1:
        raise DataError(_missing_message(out_dir, missing, len(sources)))
    return ShardedResult(out_dir, manifest, len(mine), written, skipped, documents, tokens,
                         time.monotonic() - start, len(missing))


def _run_jobs(jobs: Sequence[_Job], spec: Any, tokenizer: Any, dtype: Any, workers: int,
              progress: Optional[bool], log: Callable[[str], None]) -> list[dict]:
    """Process the jobs (in-process with one worker, else a pool taking whole sources), with a
    progress bar on a terminal and one log line per finished shard."""
    from tqdm import tqdm

    bar = None
    if progress is not False and jobs:
        bar = tqdm(unit="doc", desc="preprocess", disable=None if progress is None else False,
                   file=sys.stderr, dynamic_ncols=True)
    say = (lambda m: bar.write(m, file=sys.stdout)) if bar is not None and not bar.disable else log
    state = {"tokens": 0, "start": time.monotonic(), "shards": 0}

    def handle(event) -> None:
        if event[0] == "progress":
            state["tokens"] += event[2]
            if bar is not None:
                bar.update(event[1])
                rate = state["tokens"] / max(time.monotonic() - state["start"], 1e-9)
                bar.set_postfix_str(f"{rate / 1e3:,.1f}k tok/s", refresh=False)
        else:
            _, prefix, record = event
            state["shards"] += 1
            held = (f", {record['valid_documents']:,} held out" if record["valid_documents"]
                    else "")
            say(f"shard done: {prefix}: {record['documents']:,} documents{held}, "
                f"{record['tokens'] + record['valid_tokens']:,} tokens")

    summaries: list[dict] = []
    try:
        if workers == 1 or len(jobs) <= 1:
            _worker_init(tokenizer, dtype, None)
            _STATE["emit"] = handle
            for job in jobs:
                summaries.append(_process_source(job))
        else:
            events = _pool_context().Queue()
            # Objects of this process stay untouched by the workers' garbage collector, so their
            # memory pages are not copied into every forked worker.
            gc.freeze()
            with _pool_context().Pool(min(workers, len(jobs)), initializer=_worker_init,
                                      initargs=(spec, dtype, events)) as pool:
                results = pool.imap_unordered(_process_source, jobs, chunksize=1)
                remaining = len(jobs)
                while remaining:
                    try:
                        summaries.append(results.next(timeout=0.2))
                        remaining -= 1
                    except multiprocessing.TimeoutError:
                        pass
                    _drain(events, handle)
                pool.close()
                pool.join()
            _drain(events, handle)
    finally:
        gc.unfreeze()
        if bar is not None:
            bar.close()
        _STATE.clear()
    return summaries


def _drain(events, handle) -> None:
    while True:
        try:
            handle(events.get_nowait())
        except queue_module.Empty:
            return


def array_summary(result: ShardedResult) -> str:
    """The closing line of a (task of a) sharded preprocess."""
    rate = result.tokens / max(result.seconds, 1e-9)
    head = (f"{result.sources} sources: {result.shards_written} shards written, "
            f"{result.shards_skipped} already done; {result.documents:,} documents, "
            f"{result.tokens:,} tokens in {result.seconds:.1f} s ({rate / 1e3:,.1f}k tokens/s)")
    if result.manifest is None:
        return (f"{head}. {result.missing} sources of other tasks are not done yet: the last "
                f"task to finish writes {result.out_dir}/manifest.json (or run --merge)")
    m = result.manifest
    valid = (f", {m.valid.documents:,} held-out documents ({m.valid.tokens:,} tokens) in "
             f"{result.out_dir / m.valid.prefix}" if m.valid else "")
    return (f"{head}. {result.out_dir}/manifest.json: {len(m.shards)} shards, {m.documents:,} "
            f"documents, {m.tokens:,} tokens, {m.skipped:,} empty skipped{valid}")

