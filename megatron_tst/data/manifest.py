"""``manifest.json``: what ``megatron-tst preprocess --output-dir DIR`` wrote, read defensively.

The manifest is the contract between sharded preprocessing (``megatron_tst.data.sharded``) and
the recipes (``data.train_paths: [DIR]``, ``megatron_tst.data.blend``). It is written last and
atomically, once every shard is complete, so a directory with a manifest is a finished dataset:

.. code-block:: json

    {"format": "megatron-tst-preprocess", "version": 1,
     "tokenizer": {"kind": "huggingface", "path": "/abs/tokenizer.json", "sha256": "...",
                   "vocab_size": 128256, "eod": 128001},
     "text_key": "text", "shard_documents": null,
     "valid": {"prefix": "valid_text_document", "rule": "fraction", "value": 0.001,
               "documents": 812, "tokens": 901234},
     "shards": [{"prefix": "shards/a/part-000_text_document",
                 "source": {"path": "/abs/a/part-000.jsonl.zst", "size": 123, "mtime_ns": 1},
                 "chunk": 0, "documents": 1000, "tokens": 123456, "skipped": 3,
                 "valid_documents": 1}],
     "documents": 1000, "tokens": 123456, "skipped": 3}

Prefixes are relative to the manifest's directory, so a finished directory can be copied to
another file system as a whole. ``shards`` lists only shards with training documents, in the
order of their sources (sorted paths) and chunks. ``valid`` is null without a held-out split.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from megatron_tst.data.errors import DataError

MANIFEST_NAME = "manifest.json"
#: Written by sharded preprocessing before its first shard: with it and no manifest, a directory
#: is an unfinished preprocess.
SETTINGS_NAME = "preprocess.json"
FORMAT = "megatron-tst-preprocess"
VERSION = 1


@dataclass(frozen=True)
class SourceFile:
    """An input file as it was when a shard was made from it."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> "SourceFile":
        st = path.stat()
        return cls(str(path.resolve()), int(st.st_size), int(st.st_mtime_ns))


@dataclass(frozen=True)
class TokenizerInfo:
    kind: str
    path: str
    sha256: str
    vocab_size: int
    eod: int


@dataclass(frozen=True)
class ShardEntry:
    prefix: str  # relative to the manifest's directory, without .bin/.idx
    source: SourceFile
    chunk: int
    documents: int  # training documents in the shard (held-out ones excluded)
    tokens: int  # tokens in its .bin, EODs included
    skipped: int = 0  # empty documents of this chunk of the source
    valid_documents: int = 0  # documents of this chunk held out for validation


@dataclass(frozen=True)
class ValidEntry:
    prefix: str
    rule: str  # "fraction" | "documents"
    value: float  # the fraction, or the number of documents asked for
    documents: int
    tokens: int


@dataclass(frozen=True)
class Manifest:
    tokenizer: TokenizerInfo
    text_key: str
    shard_documents: Optional[int]
    shards: tuple[ShardEntry, ...]
    valid: Optional[ValidEntry] = None
    directory: Path = field(default=Path("."), compare=False)  # where it was read from

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def skipped(self) -> int:
        return sum(s.skipped for s in self.shards)

    def path_of(self, prefix: str) -> str:
        """A prefix of this manifest as a path (its directory joined with the relative prefix)."""
        return str(self.directory / prefix)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "tokenizer": asdict(self.tokenizer),
                "text_key": self.text_key, "shard_documents": self.shard_documents,
                "valid": asdict(self.valid) if self.valid else None,
                "shards": [asdict(s) for s in self.shards], "documents": self.documents,
                "tokens": self.tokens, "skipped": self.skipped}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file, fsync and rename: a reader
    sees the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST_NAME
    write_json_atomic(path, manifest.to_json())
    return path


# ----------------------------------------------------------------------------------- reading
class _Reader:
    """Typed access to one JSON object of the manifest; any surprise is a DataError."""

    def __init__(self, path: Path, fix: str):
        self.path, self.fix = path, fix

    def fail(self, what: str) -> DataError:
        return DataError(f"{self.path} is damaged: {what}; {self.fix}")

    def get(self, obj: Any, key: str, kind: type | tuple, where: str, optional: bool = False):
        if not isinstance(obj, dict):
            raise self.fail(f"{where} is {type(obj).__name__}, not a JSON object")
        if key not in obj:
            raise self.fail(f"{where} has no {key!r}")
        value = obj[key]
        if value is None and optional:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise self.fail(f"{where}.{key} is {json.dumps(value)[:80]}, not {names}")
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise self.fail(f"{where}.{key} is negative ({value})")
        return value

    def prefix(self, obj: Any, where: str) -> str:
        prefix = self.get(obj, "prefix", str, where)
        parts = PurePosixPath(prefix).parts
        if not prefix or PurePosixPath(prefix).is_absolute() or ".." in parts:
            raise self.fail(f"{where}.prefix {prefix!r} is not a path inside the directory")
        return prefix


def read_manifest(path: str | Path) -> Manifest:
    """Read ``DIR/manifest.json`` (or the manifest file itself). Anything unexpected (not JSON,
    another format or version, a missing or mistyped field, a prefix outside the directory, a
    prefix listed twice) is a :class:`DataError` naming the file and the fix."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    directory = path.parent
    fix = (f"run `megatron-tst preprocess --output-dir {directory} ...` again with the same "
           f"inputs: finished shards are kept and the manifest is written anew")
    r = _Reader(path, fix)
    try:
        with open(path, "rb") as f:
            raw = f.read(64 << 20)
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} not found; {fix}") from None
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise r.fail(f"not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path} is not a manifest written by `megatron-tst preprocess "
                        f"--output-dir` (format {got!r}, expected {FORMAT!r}); give the "
                        f"directory preprocess wrote, or the prefix of one indexed dataset")
    version = data.get("version")
    if version != VERSION:
        raise DataError(f"{path} has manifest version {version!r}; this megatron-tst reads "
                        f"version {VERSION}: {fix}")
    tok = r.get(data, "tokenizer", dict, "manifest")
    tokenizer = TokenizerInfo(
        kind=r.get(tok, "kind", str, "tokenizer"), path=r.get(tok, "path", str, "tokenizer"),
        sha256=r.get(tok, "sha256", str, "tokenizer"),
        vocab_size=r.get(tok, "vocab_size", int, "tokenizer"),
        eod=r.get(tok, "eod", int, "tokenizer"))
    shard_documents = r.get(data, "shard_documents", int, "manifest", optional=True)
    shards, seen = [], set()
    raw_shards = r.get(data, "shards", list, "manifest")
    for i, s in enumerate(raw_shards):
        where = f"shards[{i}]"
        prefix = r.prefix(s, where)
        if prefix in seen:
            raise r.fail(f"{where}.prefix {prefix!r} is listed twice")
        seen.add(prefix)
        src = r.get(s, "source", dict, where)
        shards.append(ShardEntry(
            prefix=prefix,
            source=SourceFile(r.get(src, "path", str, f"{where}.source"),
                              r.get(src, "size", int, f"{where}.source"),
                              r.get(src, "mtime_ns", int, f"{where}.source")),
            chunk=r.get(s, "chunk", int, where), documents=r.get(s, "documents", int, where),
            tokens=r.get(s, "tokens", int, where), skipped=r.get(s, "skipped", int, where),
            valid_documents=r.get(s, "valid_documents", int, where)))
    valid = None
    v = r.get(data, "valid", dict, "manifest", optional=True)
    if v is not None:
        rule = r.get(v, "rule", str, "valid")
        if rule not in ("fraction", "documents"):
            raise r.fail(f"valid.rule is {rule!r}, not 'fraction' or 'documents'")
        valid = ValidEntry(prefix=r.prefix(v, "valid"), rule=rule,
                           value=float(r.get(v, "value", (int, float), "valid")),
                           documents=r.get(v, "documents", int, "valid"),
                           tokens=r.get(v, "tokens", int, "valid"))
    return Manifest(tokenizer=tokenizer, text_key=r.get(data, "text_key", str, "manifest"),
                    shard_documents=shard_documents, shards=tuple(shards), valid=valid,
                    directory=directory)
