"""Prepare (and cache) the demo data set: tokenizer + train/valid indexed datasets from the demo corpus.

Layout under ``cache_dir``::

    tokenizer.model           sentencepiece BPE, trained on the train split only
    train.bin / train.idx     megatron-core indexed dataset, one EOD-terminated sequence per document
    valid.bin / valid.idx
    manifest.json             arguments, corpus fingerprint, results; written last (atomically)

A call whose arguments and corpus fingerprint match ``manifest.json`` (and whose files are all
present with the recorded sizes) returns at once. Anything else (no manifest, different arguments,
an interrupted earlier run) prepares everything again, in a staging directory beside the cache
that replaces it only once complete: until then the previous preparation stays as it was. A lock
file beside the cache (``.<name>.lock``) serialises concurrent callers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_tst.data.corpus import (
    Document,
    _split_key,
    corpus_fingerprint,
    demo_documents,
    split_documents,
)

__all__ = ["DemoData", "prepare_demo_data"]

MANIFEST_NAME = "manifest.json"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class DemoData:
    """Paths and sizes of the prepared demo data (prefixes are without ``.bin``/``.idx``)."""

    tokenizer_path: Path
    train_prefix: Path
    valid_prefix: Path
    num_train_tokens: int
    num_valid_tokens: int
    num_train_documents: int = 0
    num_valid_documents: int = 0
    vocab_size: int = 0

    def load_tokenizer(self):
        """The demo's :class:`~megatron_tst.data.tokenizer.SentencePieceTokenizer`."""
        from megatron_tst.data.tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(self.tokenizer_path)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    with open(directory.with_name(f".{directory.name}.lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _subset(documents: list[Document], max_documents: int, seed: int) -> list[Document]:
    """A deterministic, source-mixed subset of ``max_documents`` documents (input order kept)."""
    if max_documents >= len(documents):
        return documents
    ranked = sorted(range(len(documents)), key=lambda i: _split_key(documents[i], seed + 1))
    return [documents[i] for i in sorted(ranked[:max_documents])]


def _files(directory: Path) -> dict[str, Path]:
    return {
        "tokenizer": directory / "tokenizer.model",
        "train_bin": directory / "train.bin",
        "train_idx": directory / "train.idx",
        "valid_bin": directory / "valid.bin",
        "valid_idx": directory / "valid.idx",
    }


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest, or None when it is missing or damaged (then the data is prepared again)."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _cached(directory: Path, arguments: dict[str, Any], fingerprint: str | None) -> DemoData | None:
    manifest = _read_manifest(directory)
    if not manifest or manifest.get("arguments") != arguments:
        return None
    if fingerprint is not None and manifest.get("corpus_fingerprint") != fingerprint:
        return None
    sizes, results = manifest.get("file_sizes"), manifest.get("results")
    if not isinstance(sizes, dict) or not isinstance(results, dict):
        return None
    for name, path in _files(directory).items():
        try:
            if path.stat().st_size != sizes.get(name):
                return None
        except OSError:
            return None
    try:
        return _demo_data(directory, results)
    except (KeyError, TypeError):
        return None


def _demo_data(directory: Path, results: dict[str, int]) -> DemoData:
    files = _files(directory)
    return DemoData(
        tokenizer_path=files["tokenizer"],
        train_prefix=directory / "train",
        valid_prefix=directory / "valid",
        num_train_tokens=results["num_train_tokens"],
        num_valid_tokens=results["num_valid_tokens"],
        num_train_documents=results["num_train_documents"],
        num_valid_documents=results["num_valid_documents"],
        vocab_size=results["vocab_size"],
    )


def prepare_demo_data(
    cache_dir: Path,
    vocab_size: int = 4096,
    valid_fraction: float = 0.05,
    seed: int = 1234,
    *,
    max_documents: int | None = None,
) -> DemoData:
    """Build the demo data under ``cache_dir``, or return the cached result of an identical call.

    Reads :func:`~megatron_tst.data.corpus.demo_documents` (gensim needed), optionally keeps a
    deterministic subset of ``max_documents`` documents (for quick tests), splits by document
    (:func:`~megatron_tst.data.corpus.split_documents`), trains a sentencepiece BPE tokenizer of
    ``vocab_size`` on the train split only, and writes the ``train`` and ``valid`` indexed datasets.
    Takes a few seconds for the whole corpus (~1 M tokens at vocab 4096).
    """
    from megatron_tst.data.preprocess import preprocess_documents
    from megatron_tst.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    if max_documents is not None and max_documents < 2:
        raise ValueError(f"max_documents must be at least 2, got {max_documents}")
    directory = Path(cache_dir).expanduser().resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    arguments = {
        "format_version": _FORMAT_VERSION,
        "vocab_size": int(vocab_size),
        "valid_fraction": float(valid_fraction),
        "seed": int(seed),
        "max_documents": None if max_documents is None else int(max_documents),
    }

    with _locked(directory):
        try:
            fingerprint: str | None = corpus_fingerprint()
        except ImportError:
            # gensim is missing: an existing, matching preparation is still usable.
            cached = _cached(directory, arguments, None)
            if cached is not None:
                return cached
            raise
        cached = _cached(directory, arguments, fingerprint)
        if cached is not None:
            return cached

        staging = directory.with_name(f".{directory.name}.staging")
        shutil.rmtree(staging, ignore_errors=True)  # a crashed earlier preparation's
        staging.mkdir()
        documents = demo_documents()
        if max_documents is not None:
            documents = _subset(documents, max_documents, seed)
        train, valid = split_documents(documents, valid_fraction=valid_fraction, seed=seed)
        files = _files(staging)
        train_sentencepiece(
            (doc.text for doc in train), files["tokenizer"].with_suffix(""), vocab_size, seed=seed
        )
        tokenizer = SentencePieceTokenizer(files["tokenizer"])
        train_result = preprocess_documents([d.text for d in train], staging / "train", tokenizer)
        valid_result = preprocess_documents([d.text for d in valid], staging / "valid", tokenizer)

        results = {
            "num_train_tokens": train_result.num_tokens,
            "num_valid_tokens": valid_result.num_tokens,
            "num_train_documents": train_result.num_documents,
            "num_valid_documents": valid_result.num_documents,
            "vocab_size": tokenizer.vocab_size,
        }
        manifest = {
            "arguments": arguments,
            "corpus_fingerprint": fingerprint,
            "results": results,
            "file_sizes": {name: path.stat().st_size for name, path in files.items()},
            "valid_titles": [f"{d.source}/{d.title}" for d in valid],
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n",
                                             encoding="utf-8")
        _swap_in(staging, directory)
        return _demo_data(directory, results)


def _swap_in(staging: Path, directory: Path) -> None:
    """Replace ``directory`` by the complete ``staging`` (two renames; a crash between them
    leaves no cache, which the next call prepares again)."""
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old, ignore_errors=True)
