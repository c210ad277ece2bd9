"""Tokenize text, JSON Lines, Parquet or Arrow data into megatron-core indexed datasets
(``<prefix>.bin`` + ``<prefix>.idx``).

Inputs are files, directories and glob patterns, read by :mod:`megatron_tst.data.sources` (which
documents the formats: ``.jsonl``/``.json`` and ``.txt``, optionally ``.gz``/``.bz2``/``.zst``
compressed, ``.parquet``, Hugging Face datasets saved to disk). In ``.txt`` files documents are
separated by one or more blank lines (lines holding only whitespace count as blank); line breaks
inside a document are kept.

Every document becomes one sequence of one document in the indexed dataset: its token ids followed
by the tokenizer's ``eod`` id. Documents that are empty or whitespace-only are skipped (counted in
``PreprocessResult.num_skipped``). The token dtype is megatron-core's ``DType.optimal_dtype`` for the
vocabulary size (uint16 below 65500 tokens, else int32). Outputs are written to temporary files and
renamed at the end, so an interrupted run never leaves a truncated dataset under the final name.

With ``workers > 1`` tokenization runs in a process pool (an initializer loads the tokenizer once per
worker, results come back in input order), so the output is byte-identical to ``workers=1``.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy

from megatron_tst.data.errors import DataError
from megatron_tst.data.sources import (
    SUPPORTED_SUFFIXES,
    DocumentCounter,
    ExpandedInputs,
    Source,
    expand_inputs,
    read_documents,
)

__all__ = [
    "DataError",
    "PreprocessResult",
    "SUPPORTED_SUFFIXES",
    "add_preprocess_arguments",
    "iter_documents",
    "preprocess",
    "preprocess_documents",
    "run_preprocess",
]

_BATCH_DOCUMENTS = 64  # documents per task sent to a worker
_PROGRESS_MIN_BYTES = 32 << 20  # show a progress bar when the inputs are at least this large


@dataclass(frozen=True)
class PreprocessResult:
    """What :func:`preprocess` wrote. ``num_tokens`` counts every token in the ``.bin``, EODs included."""

    prefix: Path
    num_documents: int
    num_tokens: int
    num_skipped: int = 0

    @property
    def bin_path(self) -> Path:
        return Path(f"{self.prefix}.bin")

    @property
    def idx_path(self) -> Path:
        return Path(f"{self.prefix}.idx")


# --------------------------------------------------------------------------------------------------
# Reading inputs (megatron_tst.data.sources)
# --------------------------------------------------------------------------------------------------
def _sources(inputs: Sequence[Path | str] | ExpandedInputs) -> list[Source]:
    if isinstance(inputs, ExpandedInputs):
        return list(inputs.sources)
    return expand_inputs(inputs).sources


def iter_documents(inputs: Sequence[Path | str] | ExpandedInputs, text_key: str = "text") -> Iterator[str]:
    """Stream the documents of all inputs (files, directories, glob patterns: see
    :mod:`megatron_tst.data.sources` for the formats), in order.

    Raises :class:`DataError` for missing/unsupported inputs, bad bytes, bad JSON or rows, a
    missing text key or column, and for a file that holds no documents.
    """
    for source in _sources(inputs):
        yield from read_documents(source, text_key, DocumentCounter())


# --------------------------------------------------------------------------------------------------
# Tokenizing and writing
# --------------------------------------------------------------------------------------------------
_WORKER_TOKENIZER: Any = None
_WORKER_DTYPE: Any = None


def _worker_init(tokenizer_or_spec: Any, dtype: Any) -> None:
    """Pool initializer: load the tokenizer once per worker process."""
    global _WORKER_TOKENIZER, _WORKER_DTYPE
    from megatron_tst.data.tokenizer import TokenizerSpec

    if isinstance(tokenizer_or_spec, TokenizerSpec):
        _WORKER_TOKENIZER = tokenizer_or_spec.load()
    else:
        _WORKER_TOKENIZER = tokenizer_or_spec
    _WORKER_DTYPE = dtype


def _encode_batch_with(tokenizer: Any, dtype: Any, texts: Sequence[str]) -> list[numpy.ndarray]:
    batch = getattr(tokenizer, "tokenize_batch", None)
    token_lists = batch(texts) if batch is not None else [tokenizer.tokenize(t) for t in texts]
    eod = tokenizer.eod
    out = []
    for ids in token_lists:
        array = numpy.empty(len(ids) + 1, dtype=dtype)
        array[:-1] = ids
        array[-1] = eod
        out.append(array)
    return out


def _worker_encode(texts: Sequence[str]) -> list[numpy.ndarray]:
    return _encode_batch_with(_WORKER_TOKENIZER, _WORKER_DTYPE, texts)


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _as_spec(spec: Any):
    """Normalise a (kind, path[, options]) tuple or TokenizerSpec; None stays None."""
    from megatron_tst.data.tokenizer import TokenizerSpec

    if spec is None or isinstance(spec, TokenizerSpec):
        return spec
    if isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        options = dict(spec[2]) if len(spec) == 3 else {}
        return TokenizerSpec(str(spec[0]), str(spec[1]), options)
    raise TypeError(f"a tokenizer spec is (kind, path) or (kind, path, options), got {spec!r}")


def _resolve_tokenizer(tokenizer: Any, tokenizer_spec: Any) -> tuple[Any, Any]:
    """(tokenizer object, spec or None) from the user's arguments."""
    from megatron_tst.data.tokenizer import tokenizer_spec_of

    spec = _as_spec(tokenizer_spec)
    if isinstance(tokenizer, (tuple, list)):
        spec = spec or _as_spec(tokenizer)
        tokenizer = _as_spec(tokenizer).load()
    elif tokenizer is None:
        if spec is None:
            raise ValueError("pass a tokenizer object or a (kind, path) tokenizer spec")
        tokenizer = spec.load()
    if spec is None:
        spec = tokenizer_spec_of(tokenizer)
    for attribute in ("eod", "vocab_size"):
        if not hasattr(tokenizer, attribute):
            raise TypeError(f"the tokenizer {tokenizer!r} has no {attribute!r} attribute")
    return tokenizer, spec


def _token_dtype(vocab_size: int) -> type:
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(int(vocab_size))


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork is cheap (the parent has already imported megatron-core and the tokenizer); elsewhere the
    # platform default (spawn) re-imports this module in each worker.
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _write_indexed_dataset(
    documents: Iterable[str],
    output_prefix: Path | str,
    tokenizer: Any,
    spec: Any,
    workers: int,
    progress: bool | None,
) -> tuple[Path, int, int]:
    """Tokenize ``documents`` and write ``<prefix>.bin/.idx``; return (prefix, documents, tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    prefix = Path(output_prefix)
    dtype = _token_dtype(tokenizer.vocab_size)
    tmp_prefix = prefix.with_name(f".{prefix.name}.tmp{os.getpid()}")
    tmp_bin, tmp_idx = Path(f"{tmp_prefix}.bin"), Path(f"{tmp_prefix}.idx")
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    except OSError as err:
        raise DataError(f"cannot write {prefix}.bin in {prefix.parent} ({err.strerror or err}); "
                        f"give an --output-prefix in a writable directory",
                        key="--output-prefix", value=str(prefix)) from None
    num_documents = num_tokens = 0
    pool = None
    bar = None
    try:
        batches = _batched(documents, _BATCH_DOCUMENTS)
        if workers > 1:
            pool = _pool_context().Pool(
                workers, initializer=_worker_init, initargs=(spec or tokenizer, dtype)
            )
            # imap keeps input order; feed it a bounded window at a time so a huge input is never
            # read into memory ahead of the workers.
            window = workers * 8

            def encoded() -> Iterator[list[numpy.ndarray]]:
                while group := list(itertools.islice(batches, window)):
                    yield from pool.imap(_worker_encode, group, chunksize=1)

            results: Iterable[list[numpy.ndarray]] = encoded()
        else:
            results = (_encode_batch_with(tokenizer, dtype, batch) for batch in batches)
        # progress: True -> always, False -> never, None -> when stderr is a terminal (tqdm's rule).
        # No tqdm object at all when off: tqdm starts a monitor thread, unwelcome before a fork.
        if progress is not False:
            bar = tqdm(
                unit="doc",
                desc=f"tokenizing -> {prefix.name}",
                disable=None if progress is None else False,
                file=sys.stderr,
            )
        for arrays in results:
            for array in arrays:
                builder.add_document(array, [array.size])
                num_tokens += int(array.size)
            num_documents += len(arrays)
            if bar is not None:
                bar.update(len(arrays))
        if num_documents == 0:
            raise DataError(f"{prefix}: no documents to write (all inputs were empty)")
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, f"{prefix}.bin")
        os.replace(tmp_idx, f"{prefix}.idx")
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        for path in (tmp_bin, tmp_idx):
            try:
                path.unlink()
            except OSError:  # gone already, or the location went away: never hide the error
                pass
    return prefix, num_documents, num_tokens


def preprocess(
    inputs: Sequence[Path | str] | ExpandedInputs,
    output_prefix: Path,
    tokenizer: Any,
    *,
    workers: int = 1,
    text_key: str = "text",
    tokenizer_spec: Any = None,
    progress: bool | None = None,
) -> PreprocessResult:
    """Tokenize the documents of ``inputs`` (files, directories or glob patterns, or what
    :func:`~megatron_tst.data.sources.expand_inputs` returned; formats in
    :mod:`megatron_tst.data.sources`) into ``<output_prefix>.bin`` and ``<output_prefix>.idx``, in
    input order, appending ``tokenizer.eod`` to every document.

    ``tokenizer`` is a tokenizer object (anything with ``tokenize``, ``eod`` and ``vocab_size``) or a
    ``(kind, path[, options])`` spec for :func:`~megatron_tst.data.tokenizer.load_tokenizer`.
    With ``workers > 1`` each worker loads the tokenizer once, from ``tokenizer_spec``, else from the
    object's own ``spec`` (the project's tokenizers have one), else from a pickled copy of the object.
    ``progress``: True/False forces the tqdm bar on/off; None shows it for inputs over 32 MiB when
    stderr is a terminal. Raises :class:`DataError` for bad inputs (before writing any output when an
    input is missing or unsupported).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    sources = _sources(inputs)
    tokenizer, spec = _resolve_tokenizer(tokenizer, tokenizer_spec)
    counter = DocumentCounter()

    def documents() -> Iterator[str]:
        for source in sources:
            yield from read_documents(source, text_key, counter)

    total_bytes = sum(source.path.stat().st_size for source in sources)
    show = progress if progress is not None else (None if total_bytes >= _PROGRESS_MIN_BYTES else False)
    prefix, num_documents, num_tokens = _write_indexed_dataset(
        documents(), output_prefix, tokenizer, spec, workers, show
    )
    return PreprocessResult(prefix, num_documents, num_tokens, counter.skipped)


def preprocess_documents(
    texts: Iterable[str], output_prefix: Path, tokenizer: Any, *, progress: bool | None = False
) -> PreprocessResult:
    """Tokenize in-memory documents into ``<output_prefix>.bin/.idx`` (one process, input order),
    appending ``tokenizer.eod`` to each; empty or whitespace-only texts are skipped."""
    tokenizer, spec = _resolve_tokenizer(tokenizer, None)
    counter = DocumentCounter()

    def documents() -> Iterator[str]:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"documents must be strings, got {type(text).__name__}")
            if text.strip():
                counter.documents += 1
                yield text
            else:
                counter.skipped += 1

    prefix, num_documents, num_tokens = _write_indexed_dataset(
        documents(), output_prefix, tokenizer, spec, 1, progress
    )
    return PreprocessResult(prefix, num_documents, num_tokens, counter.skipped)


# --------------------------------------------------------------------------------------------------
# CLI glue: `megatron-tst preprocess ...`
# --------------------------------------------------------------------------------------------------
DEFAULT_TRAIN_VOCAB_SIZE = 8000


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``preprocess`` subcommand's arguments to ``parser``."""
    parser.add_argument(
        "--input", nargs="+", required=True, type=Path, metavar="INPUT",
        help="input files, directories (read recursively) or quoted glob patterns ('**' for any "
        "depth): .jsonl/.json (JSON Lines) or .txt (documents separated by blank lines), optionally "
        ".gz/.bz2/.zst compressed, .parquet, or a Hugging Face dataset saved with save_to_disk",
    )
    output = parser.add_mutually_exclusive_group(required=True)
    output.add_argument(
        "--output-prefix", type=Path, metavar="PREFIX",
        help="write everything into one indexed dataset: PREFIX.bin and PREFIX.idx",
    )
    output.add_argument(
        "--output-dir", type=Path, metavar="DIR",
        help="one indexed dataset per input source (or per --shard-documents documents) under "
        "DIR/shards, then DIR/manifest.json; resumable, and splittable over machines with "
        "--num-shards/--shard-index (docs/data.md)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--tokenizer-model", type=Path, metavar="MODEL",
                       help="a sentencepiece .model file")
    group.add_argument("--hf-tokenizer", type=Path, metavar="JSON",
                       help="a Hugging Face tokenizer.json (or a directory containing one)")
    group.add_argument(
        "--train-tokenizer", action="store_true",
        help="train a sentencepiece BPE tokenizer on the inputs, saved as PREFIX.tokenizer.model "
        "(the default when no tokenizer is given)",
    )
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"vocabulary size for --train-tokenizer (default {DEFAULT_TRAIN_VOCAB_SIZE})")
    parser.add_argument("--eod-token", default=None,
                        help="end-of-document token of --hf-tokenizer (default: found by name)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--text-key", default="text", help="JSON key or Parquet/Arrow column holding the text (default 'text')")
    parser.add_argument("--seed", type=int, default=1234, help="seed for --train-tokenizer")
    sharded = parser.add_argument_group("with --output-dir")
    sharded.add_argument("--shard-documents", type=int, metavar="N",
                         help="a shard per N documents of a source (default: a shard per source)")
    sharded.add_argument("--num-shards", type=int, metavar="K",
                         help="split the sources over K tasks (default: SLURM_ARRAY_TASK_COUNT, "
                         "else 1)")
    sharded.add_argument("--shard-index", type=int, metavar="I",
                         help="this task's index, 0 to K-1 (default: SLURM_ARRAY_TASK_ID minus "
                         "SLURM_ARRAY_TASK_MIN)")
    sharded.add_argument("--merge", action="store_true",
                         help="tokenize nothing: check that every shard is done and write "
                         "DIR/manifest.json (the step after an array of tasks)")
    held_out = sharded.add_mutually_exclusive_group()
    held_out.add_argument("--valid-fraction", type=float, metavar="F",
                          help="hold out each document whose hash falls in the lowest fraction F "
                          "as DIR/valid_text_document")
    held_out.add_argument("--valid-documents", type=int, metavar="N",
                          help="hold out the N documents with the smallest hashes as "
                          "DIR/valid_text_document (reads the inputs once more first)")
    return parser


_SHARDED_ONLY = ("shard_documents", "num_shards", "shard_index", "merge", "valid_fraction",
                 "valid_documents")


def run_preprocess(args: argparse.Namespace, *, out: Callable[[str], None] = print) -> int:
    """Run the ``preprocess`` subcommand; returns the exit status (0 ok, 1 bad input, 130 when
    interrupted). Flags are checked before anything is imported or read."""

    def fail(message: str) -> int:
        print(f"megatron-tst preprocess: error: {message}", file=sys.stderr)
        return 1

    sharded = args.output_dir is not None
    if not sharded:
        given = [f"--{k.replace('_', '-')}" for k in _SHARDED_ONLY if getattr(args, k, None)]
        if given:
            return fail(f"{', '.join(given)} only apply with --output-dir DIR (one shard per "
                        f"source and a manifest), not with --output-prefix")
    elif not (args.tokenizer_model or args.hf_tokenizer):
        return fail("--output-dir needs the tokenizer file (--hf-tokenizer or --tokenizer-model): "
                    "every shard and the manifest must be made with one fixed tokenizer; train one "
                    "first with --output-prefix ... --train-tokenizer if you need to")
    if args.workers < 1:
        return fail(f"--workers must be >= 1, got {args.workers}")
    if args.vocab_size is not None and (args.tokenizer_model or args.hf_tokenizer):
        return fail("--vocab-size only applies when training a tokenizer (--train-tokenizer)")
    if args.eod_token is not None and not args.hf_tokenizer:
        return fail("--eod-token only applies to --hf-tokenizer")
    try:
        from megatron_tst.data.tokenizer import load_tokenizer, train_sentencepiece

        inputs = expand_inputs(args.input)
        if inputs.ignored:
            shown = ", ".join(str(p) for p in inputs.ignored[:5])
            more = f" and {len(inputs.ignored) - 5} more" if len(inputs.ignored) > 5 else ""
            print(f"megatron-tst preprocess: note: ignored {len(inputs.ignored)} file(s) with "
                  f"unsupported suffixes in the input directories: {shown}{more}", file=sys.stderr)
        if args.tokenizer_model:
            tokenizer = load_tokenizer("sentencepiece", args.tokenizer_model)
        elif args.hf_tokenizer:
            options = {"eod_token": args.eod_token} if args.eod_token else {}
            tokenizer = load_tokenizer("huggingface", args.hf_tokenizer, **options)
        else:
            vocab_size = args.vocab_size or DEFAULT_TRAIN_VOCAB_SIZE
            model_prefix = Path(f"{args.output_prefix}.tokenizer")
            model_path = train_sentencepiece(
                iter_documents(inputs, args.text_key), model_prefix, vocab_size, seed=args.seed
            )
            tokenizer = load_tokenizer("sentencepiece", model_path)
        if sharded:
            from megatron_tst.data.sharded import (array_summary, preprocess_sharded,
                                                   task_from_environment)

            num_shards, shard_index = task_from_environment(args.num_shards, args.shard_index)
            sharded_result = preprocess_sharded(
                inputs, args.output_dir, tokenizer, workers=args.workers, text_key=args.text_key,
                shard_documents=args.shard_documents, num_shards=num_shards,
                shard_index=shard_index, merge_only=args.merge,
                valid_fraction=args.valid_fraction, valid_documents=args.valid_documents, log=out)
            out(array_summary(sharded_result))
            return 0
        result = preprocess(
            inputs, args.output_prefix, tokenizer, workers=args.workers, text_key=args.text_key
        )
    except (DataError, ValueError, OSError) as err:  # OSError: an unwritable location
        return fail(str(err))
    except KeyboardInterrupt:
        print("megatron-tst preprocess: interrupted"
              + ("; finished shards are kept: run the same command again to resume"
                 if sharded else ""), file=sys.stderr)
        return 130
    skipped = f", {result.num_skipped} empty skipped" if result.num_skipped else ""
    out(
        f"preprocessed {result.num_documents} documents{skipped}, {result.num_tokens} tokens "
        f"(incl. EOD) -> {result.bin_path}, {result.idx_path} (tokenizer: {tokenizer.path})"
    )
    return 0
