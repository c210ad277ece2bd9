"""Checks of a run's data before megatron-core reads it: bounded work, one-paragraph errors.

megatron-core memory-maps indexed datasets and trusts them. A truncated ``.bin`` fails (or reads
garbage) only when training reaches the missing bytes; the ``.idx`` of another dataset reads the
wrong tokens; a split with no tokens makes ``GPTDataset`` loop forever while it counts epochs; an
unweighted blend yields one pass over its data and fails with an ``IndexError`` once a long run
has used it up; a token id beyond the vocabulary crashes the embedding (on GPU, a device-side
assert that names nothing). The checks here find all of that at start-up, from the ``.idx``
header, a handful of index entries and a bounded sample of tokens per file: the work is O(number
of files), never O(tokens), so a multi-TB corpus starts as fast as a small one. Per file it is a
constant: two ``stat``s, one open of the ``.idx`` for its header and the sampled entries
(:class:`IndexedFiles` keeps the few it read) and one open of the ``.bin``; the token-id
sample has a total budget over all the files of a run (:func:`token_sample`), so 10,000 shards
(a directory written by ``megatron-tst preprocess --output-dir``) are checked in about a second.

The ``.idx`` format (``megatron/core/datasets/indexed_dataset.py``, ``_IndexWriter``): the 9-byte
header ``MMIDIDX\\x00\\x00``, version 1 (``<Q``), the token dtype code (``<B``), the sequence count
``n`` and document count ``d`` (``<Q`` each), then ``n`` int32 sequence lengths, ``n`` int64 byte
offsets into the ``.bin`` and ``d`` int64 document boundaries (sequence indices, ``0`` first and
``n`` last). The ``.bin`` is the tokens, back to back: ``offset[-1] + length[-1] * itemsize``
bytes.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np

from megatron_tst.data.errors import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron's _INDEX_HEADER
INDEX_VERSION = 1
INDEX_PREAMBLE_BYTES = 9 + 8 + 1 + 8 + 8  # header, version, dtype code, sequence and doc counts
#: megatron's ``DType`` codes (``indexed_dataset.DType``).
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}

#: Validation split of the training blend when ``data.valid_paths`` is empty (megatron's
#: ``split``: fractions of each dataset's sequences, train/valid/test).
VALID_SPLIT = "98,2,0"
#: Extra samples megatron builds per dataset of a weighted blend (``mid_level_dataset_surplus``).
BLEND_SURPLUS = 0.005

#: Token-id sample per file: this many sequences, evenly spaced (first and last included), each
#: read up to this many tokens. At most 32 x 4096 x 4 bytes = 512 KiB per file. This is the
#: sample of a run with up to :data:`SAMPLE_BUDGET_SEQUENCES` / 32 files; more files share
#: the budgets below (:func:`token_sample`).
SAMPLE_SEQUENCES = 32
SAMPLE_TOKENS_PER_SEQUENCE = 4096
#: The token-id sample of a whole run, over all its files: at most this many sequences (but the
#: first and the last of every file, always) and about this many tokens (but at least
#: :data:`MIN_SAMPLE_TOKENS_PER_SEQUENCE` per sampled sequence). 10,000 shards: 2 sequences of
#: 256 tokens each, 10 MiB of uint16 read in all.
SAMPLE_BUDGET_SEQUENCES = 1024
SAMPLE_BUDGET_TOKENS = 1 << 22
MIN_SAMPLE_TOKENS_PER_SEQUENCE = 256
#: Beyond these, megatron's sample index would take hours to count or more memory than a node has:
#: a run that reads its data a million times, or an index of 2^34 document entries (64 GiB).
MAX_EPOCHS = 1_000_000
MAX_DOCUMENT_INDEX_ENTRIES = 2 ** 34
MAX_SAMPLES = 2 ** 32


@dataclass(frozen=True)
class DataSource:
    """One indexed dataset of a run and how to name it in an error."""

    prefix: str
    key: str  # the config key that names it, e.g. data.train_paths[0]
    label: str = ""  # how to call it in a message; default: the prefix
    #: The recipe's value of ``key`` when this dataset is one shard of it (a directory or a
    #: manifest, ``megatron_tst.data.blend``); default: the prefix.
    entry: Optional[str] = None

    @property
    def name(self) -> str:
        return self.label or self.prefix

    @property
    def value(self) -> str:
        """What the recipe gives for ``key`` (the value an error quotes)."""
        return self.prefix if self.entry is None else self.entry


class TokenSample(NamedTuple):
    """The token-id sample of each file: ``sequences`` evenly spaced sequences (first and last
    included), read up to ``tokens_per_sequence`` tokens each."""

    sequences: int = SAMPLE_SEQUENCES
    tokens_per_sequence: int = SAMPLE_TOKENS_PER_SEQUENCE


def token_sample(num_files: int) -> TokenSample:
    """The per-file sample of a run that checks ``num_files`` files: :data:`SAMPLE_SEQUENCES` x
    :data:`SAMPLE_TOKENS_PER_SEQUENCE` while the budgets allow (32 files), then fewer sequences
    (down to the first and last of each file) and fewer tokens per sequence (down to
    :data:`MIN_SAMPLE_TOKENS_PER_SEQUENCE`): the whole sample stays about
    :data:`SAMPLE_BUDGET_TOKENS` tokens whatever the number of files."""
    files = max(int(num_files), 1)
    sequences = min(SAMPLE_SEQUENCES, max(2, SAMPLE_BUDGET_SEQUENCES // files))
    tokens = min(SAMPLE_TOKENS_PER_SEQUENCE,
                 max(MIN_SAMPLE_TOKENS_PER_SEQUENCE, SAMPLE_BUDGET_TOKENS // (files * sequences)))
    return TokenSample(sequences, tokens)


@dataclass(frozen=True)
class IndexedFiles:
    """What the ``.idx`` of a checked prefix says (the ``.bin`` matches it).

    Index entries are read in file order through one open of the ``.idx`` per call of
    :meth:`load` (no file stays open or mapped), and the entries read are kept: the checks that
    follow :func:`read_index` (the token-id sample, the split sizes) find the sampled ones
    without opening the file again."""

    source: DataSource
    dtype: type
    num_sequences: int
    num_documents: int
    bin_bytes: int
    #: (table, index) -> value of the index entries read so far (a few per file).
    _known: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def idx_path(self) -> str:
        return self.source.prefix + ".idx"

    @property
    def bin_path(self) -> str:
        return self.source.prefix + ".bin"

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def num_tokens(self) -> int:
        return self.bin_bytes // self.itemsize

    def _offset(self, table: str, i: int) -> int:
        """Byte offset of entry ``i`` of ``table`` ("lengths", "pointers", "documents")."""
        n = self.num_sequences
        if table == "lengths":
            return INDEX_PREAMBLE_BYTES + 4 * i
        if table == "pointers":
            return INDEX_PREAMBLE_BYTES + 4 * n + 8 * i
        if table == "documents":
            return INDEX_PREAMBLE_BYTES + 12 * n + 8 * i
        raise ValueError(f"unknown index table {table!r}")

    def load(self, wanted: dict[str, Iterable[int]], index: Optional[BinaryIO] = None) -> None:
        """Read the entries ``wanted`` (table -> indices) that are not known yet, in file order,
        through one open of the ``.idx`` (or through ``index``, the ``.idx`` opened already)."""
        known = self._known
        todo = sorted({(self._offset(t, int(i)), t, int(i)) for t, indices in wanted.items()
                       for i in indices if (t, i) not in known})
        if not todo:
            return
        if index is None:
            with open(self.idx_path, "rb") as f:
                return self.load(wanted, f)
        for offset, table, i in todo:
            fmt = "<i" if table == "lengths" else "<q"
            size = 4 if table == "lengths" else 8
            index.seek(offset)
            raw = index.read(size)
            if len(raw) != size:  # shorter than read_index saw it: it is being rewritten
                raise _fail(self.source, f"{self.idx_path} changed while it was read (it is "
                                         f"{offset + len(raw):,} bytes at most now); copy the "
                                         f"files of {self.source.prefix} again")
            known[(table, i)] = struct.unpack(fmt, raw)[0]

    def entries(self, table: str, indices: Sequence[int]) -> list[int]:
        """Entries ``indices`` of ``table`` ("lengths", "pointers" or "documents")."""
        self.load({table: indices})
        return [self._known[(table, int(i))] for i in indices]

    def _entry(self, table: str, i: int) -> int:
        value = self._known.get((table, i))
        return value if value is not None else self.entries(table, [i])[0]

    def length(self, i: int) -> int:
        return self._entry("lengths", i)

    def pointer(self, i: int) -> int:
        return self._entry("pointers", i)

    def document_boundary(self, j: int) -> int:
        return self._entry("documents", j)

    def tokens_in(self, begin: int, end: int) -> int:
        """Tokens in sequences ``[begin, end)`` (three index entries; none for the whole file,
        whose size :func:`read_index` checked)."""
        if end <= begin:
            return 0
        if begin == 0 and end == self.num_sequences:
            return self.num_tokens
        self.load({"pointers": [begin, end - 1], "lengths": [end - 1]})
        last = self.pointer(end - 1) + self.length(end - 1) * self.itemsize
        return (last - self.pointer(begin)) // self.itemsize

    def read_tokens(self, i: int, limit: int) -> np.ndarray:
        count = max(min(self.length(i), limit), 0)
        with open(self.bin_path, "rb") as f:
            f.seek(self.pointer(i))
            return np.frombuffer(f.read(count * self.itemsize), dtype=self.dtype)

    def read_samples(self, indices: Sequence[int], limit: int) -> Iterator[tuple[int, np.ndarray]]:
        """(i, the first ``limit`` tokens of sequence i) for each of ``indices``, through one open
        of the ``.bin``."""
        self.load({"lengths": indices, "pointers": indices})
        with open(self.bin_path, "rb") as f:
            for i in indices:
                f.seek(self.pointer(i))
                count = max(min(self.length(i), limit), 0)
                yield i, np.frombuffer(f.read(count * self.itemsize), dtype=self.dtype)


def _fail(source: DataSource, message: str) -> DataError:
    return DataError(message, key=source.key, value=source.value)


# ----------------------------------------------------------------------------- files and index
def _file_size(path: str) -> Optional[int]:
    """The size of a regular file (following links), or None when there is none."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def read_index(source: DataSource, *, sample: TokenSample = TokenSample()) -> IndexedFiles:
    """Check that ``PREFIX.idx`` and ``PREFIX.bin`` exist, that the index is one megatron can
    read, and that the ``.bin`` holds exactly the bytes the index describes (the offsets are
    checked at ``sample.sequences`` evenly spaced sequences, whose entries are kept for
    :func:`check_token_ids` with the same sample)."""
    prefix = source.prefix
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    sizes = {}
    for path in (bin_, idx):
        sizes[path] = _file_size(path)
        if sizes[path] is None:
            raise _fail(source, _missing_file_message(prefix, Path(path)))
    with open(idx, "rb") as f:  # the only open of the .idx: header, then the sampled entries
        return _read_index(source, f, sizes[idx], sizes[bin_], sample)


def _read_index(source: DataSource, f: BinaryIO, idx_bytes: int, bin_bytes: int,
                sample: TokenSample) -> IndexedFiles:
    prefix = source.prefix
    idx = Path(prefix + ".idx")  # as the messages show it
    preamble = f.read(INDEX_PREAMBLE_BYTES)
    fix = (f"re-run `megatron-tst preprocess` for {prefix}, or point {source.key} at the prefix "
           f"it wrote")
    if preamble[:9] != INDEX_HEADER:
        raise _fail(source, f"{idx} is not a megatron indexed-dataset index: it starts with "
                            f"{preamble[:9]!r}, not {INDEX_HEADER!r}; {fix}")
    if len(preamble) < INDEX_PREAMBLE_BYTES:
        raise _fail(source, f"{idx} is truncated ({idx_bytes} bytes, shorter than its "
                            f"{INDEX_PREAMBLE_BYTES}-byte header); {fix}")
    version, code, n, d = struct.unpack("<QBQQ", preamble[9:])
    if version != INDEX_VERSION:
        raise _fail(source, f"{idx} has index version {version}; megatron-core reads version "
                            f"{INDEX_VERSION}; {fix}")
    if code not in DTYPE_CODES:
        raise _fail(source, f"{idx} names token dtype code {code}, which megatron-core does not "
                            f"know (codes {sorted(DTYPE_CODES)}); the index is corrupt: {fix}")
    dtype = DTYPE_CODES[code]
    if not np.issubdtype(dtype, np.integer):
        raise _fail(source, f"{idx} stores tokens as {np.dtype(dtype).name}; token ids must be "
                            f"integers: {fix}")
    expected_idx = INDEX_PREAMBLE_BYTES + 12 * n + 8 * d
    if idx_bytes not in (expected_idx, expected_idx + n):  # + n: multimodal sequence modes
        state = "truncated" if idx_bytes < expected_idx else "corrupt"
        raise _fail(source, f"{idx} is {state}: {idx_bytes:,} bytes, but its header describes "
                            f"{n:,} sequences and {max(d - 1, 0):,} documents, which take "
                            f"{expected_idx:,} bytes; {fix}")
    files = IndexedFiles(source, dtype, n, max(d - 1, 0), bin_bytes)
    if n == 0:
        raise _fail(source, f"{source.name} has no documents ({idx} describes 0 sequences): "
                            f"nothing to train on; give a dataset with documents, or remove it "
                            f"from {source.key.partition('[')[0]}")
    itemsize = files.itemsize
    sampled = _sample_indices(n, sample.sequences)
    files.load({"lengths": sampled, "documents": [0, d - 1] if d >= 2 else [],
                "pointers": sampled + [i + 1 for i in sampled if i + 1 < n]}, f)
    expected_bin = files.pointer(n - 1) + files.length(n - 1) * itemsize
    if files.pointer(0) != 0 or d < 2 or files.document_boundary(0) != 0 \
            or files.document_boundary(d - 1) != n:
        raise _fail(source, f"{idx} is corrupt: its offsets or document boundaries do not start "
                            f"at 0 and end at the last sequence; {fix}")
    if bin_bytes != expected_bin:
        raise _fail(source, _size_mismatch_message(files, expected_bin))
    _check_sampled_offsets(files, fix, sampled)
    return files


def _missing_file_message(prefix: str, missing: Path) -> str:
    p = Path(prefix)
    fix = ("give the prefix written by `megatron-tst preprocess --output-prefix` (the path without "
           ".bin/.idx), or the directory written by `megatron-tst preprocess --output-dir`")
    if p.suffix in (".bin", ".idx") and p.is_file():
        return (f"{missing} not found: {prefix} looks like one of the two files, not their "
                f"prefix; give {p.with_suffix('')} instead")
    if p.is_dir():
        return f"{missing} not found: {prefix} is a directory; {fix}"
    other = Path(prefix + (".idx" if missing.suffix == ".bin" else ".bin"))
    half = (f" ({other.name} is there: the {missing.suffix} was not copied, or was deleted)"
            if other.is_file() else "")
    where = "" if p.is_absolute() else f" (relative to the working directory {Path.cwd()})"
    return f"indexed dataset file {missing} not found{half}{where}; {fix}"


def _size_mismatch_message(files: IndexedFiles, expected: int) -> str:
    actual, itemsize, n = files.bin_bytes, files.itemsize, files.num_sequences
    tokens = expected // itemsize
    head = (f"{files.bin_path} has {actual:,} bytes but its index {files.idx_path} describes "
            f"{n:,} sequences of {tokens:,} {np.dtype(files.dtype).name} tokens, {expected:,} "
            f"bytes")
    fix = (f"copy both files of {files.source.prefix} again, or re-run `megatron-tst preprocess` "
           f"for it")
    other = [np.dtype(t).name for t in DTYPE_CODES.values()
             if np.issubdtype(t, np.integer) and np.dtype(t).itemsize != itemsize
             and tokens * np.dtype(t).itemsize == actual]
    if other:
        return (f"{head}: the .bin holds {tokens:,} tokens of {other[0]}-sized ids, so the two "
                f"files disagree on the token dtype (the .idx of another dataset, or a .bin "
                f"written differently); {fix}")
    if actual < expected:
        return (f"{head}: the .bin is truncated (an interrupted copy or preprocess) or the two "
                f"files are not a pair (the .idx of another dataset); {fix}")
    return (f"{head}: the .bin has {actual - expected:,} bytes more than its index describes, "
            f"so the two files are not a pair (the .idx of another dataset, or of an earlier "
            f"version of this one); {fix}")


def _sample_indices(n: int, k: int = SAMPLE_SEQUENCES) -> list[int]:
    return sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(min(k, n))})


def _check_sampled_offsets(files: IndexedFiles, fix: str, sampled: Sequence[int]) -> None:
    """Offsets must advance by each sequence's bytes: checked at the sampled sequences."""
    n, itemsize = files.num_sequences, files.itemsize
    for i in sampled:
        length = files.length(i)
        nxt = files.pointer(i + 1) if i + 1 < n else files.bin_bytes
        if length < 0 or nxt - files.pointer(i) != length * itemsize:
            raise _fail(files.source, f"{files.idx_path} is corrupt: sequence {i} has length "
                                      f"{length} but its offsets are {nxt - files.pointer(i)} "
                                      f"bytes apart; {fix}")


# ------------------------------------------------------------------------------- token ids
def check_token_ids(files: IndexedFiles, vocab_size: int, tokenizer_name: str, *,
                    sample: TokenSample = TokenSample()) -> None:
    """Token ids must fit the tokenizer: the ``.bin`` dtype must be able to hold them, and a
    bounded sample of the tokens (``sample``: by default :data:`SAMPLE_SEQUENCES` sequences,
    first and last included, :data:`SAMPLE_TOKENS_PER_SEQUENCE` tokens each; a run of many files
    passes :func:`token_sample`) must lie in ``[0, vocab_size)``. One open of the ``.bin``."""
    src, dtype = files.source, np.dtype(files.dtype)
    fix = ("re-run `megatron-tst preprocess` on the text with this tokenizer, or set "
           "data.tokenizer.path to the tokenizer the data was made with")
    if np.iinfo(dtype).max + 1 < vocab_size:
        raise _fail(src, f"{files.bin_path} stores token ids as {dtype.name} (at most "
                         f"{np.iinfo(dtype).max:,}) but {tokenizer_name} has {vocab_size:,} "
                         f"entries: the data was made with a smaller tokenizer (or its ids "
                         f"overflowed); {fix}")
    indices = _sample_indices(files.num_sequences, sample.sequences)
    for i, ids in files.read_samples(indices, sample.tokens_per_sequence):
        if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise _fail(src, f"token id {bad:,} in sequence {i:,} of {files.bin_path} is "
                             f"outside the vocabulary of {tokenizer_name} ({vocab_size:,} "
                             f"entries, ids 0-{vocab_size - 1:,}): the data was made with another "
                             f"tokenizer; {fix}")


# ------------------------------------------------------------------------------ sample counts
def split_bounds(num_sequences: int, split: str = VALID_SPLIT) -> list[tuple[int, int]]:
    """Sequence ranges of the train, valid and test splits, as megatron-core computes them
    (``parse_and_normalize_split`` and ``convert_split_vector_to_split_matrix``, then
    ``round(bookend * n)``)."""
    weights = np.array([float(x) for x in split.split(",")], dtype=np.float64)
    weights = (weights / weights.sum()).tolist()
    ends, total = [0.0], 0.0
    for w in weights:
        total = total + w
        ends.append(total)
    return [(int(round(a * float(num_sequences))), int(round(b * float(num_sequences))))
            for a, b in zip(ends[:-1], ends[1:])]


def samples_per_epoch(tokens: int, sequence_length: int) -> int:
    """megatron's ``GPTDataset`` samples in one pass over ``tokens`` (one extra token for the
    last label)."""
    return max(tokens - 1, 0) // sequence_length


#: Datasets an error lists by name (a blend of 10,000 shards names the first few).
_NAMED = 8


@dataclass(frozen=True)
class SplitPart:
    """The part of one indexed dataset that one split of the run reads."""

    files: IndexedFiles
    begin: int
    end: int
    what: str  # e.g. "the training data" / "the 2% validation split of"

    @cached_property
    def tokens(self) -> int:
        return self.files.tokens_in(self.begin, self.end)

    @property
    def num_sequences(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SampleShape:
    """What one dataset sample is: ``data_chunk`` x ``model.seq_length`` tokens (data_chunk =
    tst.bag_size in a TST run, else 1, see ``data/stream.py``), plus one for the last label."""

    seq_length: int
    data_chunk: int
    train_steps: int

    @property
    def tokens(self) -> int:
        return self.seq_length * self.data_chunk

    @property
    def text(self) -> str:
        if self.data_chunk == 1:
            return f"model.seq_length={self.seq_length:,}"
        return (f"model.seq_length x tst.bag_size = {self.seq_length:,} x {self.data_chunk} = "
                f"{self.tokens:,}")


def check_split(parts: Sequence[SplitPart], *, weights: Optional[Sequence[float]],
                num_samples: int, shape: SampleShape, needs_all_samples: bool,
                size_fix: str) -> None:
    """One split of the run (train or valid) can give ``num_samples`` samples of ``shape``.

    Every part must hold at least one sample (a part with no tokens makes megatron loop forever);
    an unweighted blend of several parts is read once, so together they must hold
    ``num_samples`` when ``needs_all_samples``; a single dataset or a weighted blend is repeated
    as needed, within :data:`MAX_EPOCHS` and :data:`MAX_DOCUMENT_INDEX_ENTRIES`.
    """
    length, need = shape.tokens, shape.tokens + 1
    for part in parts:
        src, tokens = part.files.source, part.tokens
        if part.num_sequences == 0:
            raise _fail(src, f"{part.what} {src.name} has no documents: megatron's "
                             f"{VALID_SPLIT} split of its {part.files.num_sequences:,} sequences, "
                             f"by count, leaves this part empty; {size_fix}")
        if tokens < need:
            raise DataError(
                f"{part.what} {src.name} holds {tokens:,} tokens, fewer than one sample needs "
                f"({shape.text}, plus 1 = {need:,}); lower model.seq_length"
                f"{' (or tst.bag_size)' if shape.data_chunk > 1 else ''}, or give more data",
                key="model.seq_length", value=shape.seq_length)
    steps_fix = "lower training.train_steps or give more data"
    if len(parts) > 1 and weights is None:
        have = sum(samples_per_epoch(p.tokens, length) for p in parts)
        if needs_all_samples and have < num_samples:
            names = ", ".join(p.files.source.name for p in parts[:_NAMED])
            if len(parts) > _NAMED:
                names += f", ... ({len(parts) - _NAMED:,} more)"
            key = parts[0].files.source.key.partition("[")[0]
            raise DataError(
                f"{parts[0].what} blends {len(parts)} datasets ({names}) without weights, so "
                f"megatron reads each of them once: {have:,} samples of {length:,} tokens, but "
                f"the run needs {num_samples:,}; {size_fix}", key=key,
                value=list(dict.fromkeys(p.files.source.value for p in parts)))
        return
    if num_samples > MAX_SAMPLES:
        raise DataError(
            f"the run reads {num_samples:,} samples of {length:,} tokens from {parts[0].what}: "
            f"megatron's sample index would not fit in memory; {steps_fix}",
            key="training.train_steps", value=shape.train_steps)
    shares = (np.asarray(weights, dtype=np.float64) / np.sum(weights)).tolist() if weights else None
    for i, part in enumerate(parts):
        samples = num_samples
        if shares:  # megatron's _get_size_per_split_per_dataset with the builder's surplus
            samples = math.ceil(math.ceil(num_samples * shares[i]) * (1 + BLEND_SURPLUS))
        epochs = math.ceil((samples * length + 1) / part.tokens)
        entries = epochs * part.num_sequences
        if epochs > MAX_EPOCHS or entries > MAX_DOCUMENT_INDEX_ENTRIES:
            raise DataError(
                f"the run reads {samples:,} samples of {length:,} tokens from {part.what} "
                f"{part.files.source.name}: {epochs:,} passes over its {part.tokens:,} tokens, "
                f"for which megatron would build an index of {entries:,} documents; {steps_fix}",
                key="training.train_steps", value=shape.train_steps)
