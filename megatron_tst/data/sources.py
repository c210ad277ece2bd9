"""The input side of ``megatron-tst preprocess``: which files to read, and their documents.

Formats, chosen by file name (suffixes are matched case-insensitively):

* ``.jsonl`` and ``.json``: JSON Lines, one JSON object per line, the text under ``text_key``
  (default ``"text"``); blank lines are ignored. A ``.json`` file is read as JSON Lines too.
* ``.txt``: UTF-8 text, documents separated by one or more blank (or whitespace-only) lines.
* either of the above compressed as ``.gz``, ``.bz2`` or ``.zst`` (``shard.jsonl.zst``, as DCLM
  ships), decompressed while reading.
* ``.parquet`` (FineWeb-Edu ships these): the string column ``text_key``, read a batch of rows at a
  time (``pyarrow.parquet.ParquetFile.iter_batches``).
* Hugging Face datasets saved with ``datasets.Dataset.save_to_disk``: a directory holding
  ``state.json`` and ``dataset_info.json``; each ``.arrow`` file that ``state.json`` lists is one
  source (Arrow IPC stream format, memory-mapped). A lone ``.arrow`` file is read too (stream
  format, else the Arrow IPC file format).

An input is a file, a directory (walked recursively in sorted order, hidden entries skipped, files
with other suffixes ignored and reported) or a glob pattern (``glob.glob(pattern, recursive=True)``,
sorted). :func:`expand_inputs` turns the inputs into :class:`Source` s, each with a stable
``name`` for its output shard; :func:`read_documents` streams one source's documents. Documents
that are empty or whitespace-only are skipped and counted; a source without any document is an
error. Every problem is a :class:`~megatron_tst.data.errors.DataError` naming the file, the line or
row, and the fix. Nothing here writes anything.

Memory stays bounded: text is read a line at a time, Parquet a batch of rows of one column at a
time, Arrow files are memory-mapped and read a record batch at a time.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import IO, Any, Optional, Union

from megatron_tst.data.errors import DataError

__all__ = [
    "COMPRESSIONS",
    "DataError",
    "DocumentCounter",
    "ExpandedInputs",
    "SUPPORTED_SUFFIXES",
    "Source",
    "expand_inputs",
    "read_documents",
]

#: Format suffixes, mapped to :attr:`Source.format`.
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt", ".parquet": "parquet", ".arrow": "arrow"}
SUPPORTED_SUFFIXES = tuple(_FORMATS)
#: Compression suffixes that may follow a text format (``.jsonl.zst``).
COMPRESSIONS = (".gz", ".bz2", ".zst")
_TEXT_FORMATS = ("jsonl", "txt")

_PARQUET_BATCH_ROWS = 1024  # rows of the text column held at a time
_ZSTD_READ_BYTES = 1 << 16  # compressed bytes decompressed at a time

_MAGIC = re.compile(r"[*?[]")  # what makes glob.glob treat a path as a pattern
_HF_STATE, _HF_INFO, _HF_DICT = "state.json", "dataset_info.json", "dataset_dict.json"

_SUPPORTED_TEXT = (
    "'.jsonl' or '.json' (JSON Lines: one JSON object per line), '.txt' (documents separated by "
    "blank lines), each optionally compressed as '.gz', '.bz2' or '.zst', '.parquet', or a Hugging "
    "Face dataset directory written by save_to_disk (its '.arrow' files)"
)


@dataclass(frozen=True)
class Source:
    """One file to read. ``name`` is a POSIX relative path without format and compression
    suffixes, stable across runs: the name of the source's output shard."""

    path: Path  # the file to read (for a Hugging Face dataset: one of its .arrow files)
    name: str
    format: str  # "jsonl" | "txt" | "parquet" | "arrow"
    compression: Optional[str]  # ".gz" | ".bz2" | ".zst" | None


@dataclass(frozen=True)
class ExpandedInputs:
    """What :func:`expand_inputs` found: the sources in reading order, and the files that
    directory walks skipped for their suffix (for a note to the user)."""

    sources: list[Source]
    ignored: list[Path]


class DocumentCounter:
    """Running counts over the sources read with it: documents yielded, empty documents skipped."""

    def __init__(self) -> None:
        self.documents = 0
        self.skipped = 0


# --------------------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------------------
def _split_name(name: str) -> Optional[tuple[str, str, Optional[str]]]:
    """(stem, format, compression) of a file name, or None when the suffixes are not supported."""
    lower = name.lower()
    compression = next((c for c in COMPRESSIONS if lower.endswith(c)), None)
    if compression:
        lower = lower[: -len(compression)]
    for suffix, fmt in _FORMATS.items():
        if lower.endswith(suffix) and len(lower) > len(suffix):
            if compression and fmt not in _TEXT_FORMATS:
                return None
            return name[: len(lower) - len(suffix)], fmt, compression
    return None


def _file_format(path: Path) -> tuple[str, str, Optional[str]]:
    """Like :func:`_split_name`, raising a DataError for an unsupported file."""
    split = _split_name(path.name)
    if split is not None:
        return split
    lower = path.name.lower()
    if any(lower.endswith(f"{s}{c}") for s in (".parquet", ".arrow") for c in COMPRESSIONS):
        raise DataError(
            f"{path}: Parquet and Arrow files cannot be read compressed as a whole (they compress "
            "their data inside); decompress the file and pass the '.parquet' / '.arrow' file."
        )
    suffixes = "".join(path.suffixes) or "(no suffix)"
    raise DataError(
        f"{path}: unsupported input format {suffixes!r}. Use {_SUPPORTED_TEXT}; rename the file "
        "accordingly or leave it out."
    )


def _posix(relative: Union[str, PurePath]) -> str:
    return PurePath(relative).as_posix()


def _strip(relative: str, stem: str) -> str:
    """``relative`` (POSIX) with its last component replaced by ``stem``."""
    head, _, _ = relative.rpartition("/")
    return f"{head}/{stem}" if head else stem


# --------------------------------------------------------------------------------------------------
# Expanding inputs
# --------------------------------------------------------------------------------------------------
class _Expansion:
    """Accumulates sources in order and checks duplicates and name collisions as it goes."""

    def __init__(self) -> None:
        self.sources: list[Source] = []
        self.ignored: list[Path] = []
        self.input_index = 0  # which input is being expanded
        self._by_file: dict[str, tuple[Source, str, int]] = {}  # real path -> (source, input, index)
        self._by_name: dict[str, Source] = {}

    def add(self, path: Path, name: str, fmt: str, compression: Optional[str], given: str,
            *, once: bool = False) -> None:
        real = os.path.realpath(path)
        if real in self._by_file:
            first, first_input, first_index = self._by_file[real]
            if once and first_index == self.input_index:  # a recursive glob's overlapping matches
                return
            if first_index != self.input_index and first_input == given:
                how = f"given twice as input {given!r}"
            elif first_index != self.input_index:
                how = f"reached by input {first_input!r} and again by input {given!r}"
            else:
                how = f"reached twice within input {given!r}"
            also = f" (also as {path}, a link)" if str(first.path) != str(path) else ""
            raise DataError(
                f"{first.path}: the same file is {how}{also}; its documents would be read twice. "
                "Pass each file once (drop the file, or the directory or pattern that contains "
                "it, from the inputs)."
            )
        source = Source(path=path, name=name, format=fmt, compression=compression)
        if name in self._by_name:
            other = self._by_name[name]
            if other.path.parent == path.parent:
                fix = ("rename one of them (names drop the format and compression suffixes, "
                       "so 'a.jsonl' and 'a.jsonl.zst' collide)")
            else:
                common = os.path.commonpath([os.path.abspath(other.path), os.path.abspath(path)])
                fix = (f"pass their common directory {common} instead of the files or "
                       "directories inside it, so that each name keeps its path below it")
            raise DataError(
                f"{other.path} and {path} get the same output name {name!r}, so their shards "
                f"would overwrite each other; {fix}."
            )
        self._by_file[real] = (source, given, self.input_index)
        self._by_name[name] = source
        self.sources.append(source)


def _is_hf_dataset(directory: Path) -> bool:
    return (directory / _HF_STATE).is_file() and (directory / _HF_INFO).is_file()


def _refuse_dataset_dict(directory: Path) -> None:
    """A DataError for a ``DatasetDict.save_to_disk`` directory (one dataset per split)."""
    try:
        splits = json.loads((directory / _HF_DICT).read_text(encoding="utf-8"))["splits"]
        names = [str(s) for s in splits]
    except (OSError, ValueError, KeyError, TypeError):
        names = sorted(p.name for p in directory.iterdir() if _is_hf_dataset(p))
    listed = ", ".join(repr(s) for s in names[:10]) or "none found"
    example = directory / (names[0] if names else "train")
    raise DataError(
        f"{directory}: a Hugging Face DatasetDict (splits: {listed}), not one dataset; pass the "
        f"directory of the split to preprocess instead, e.g. {example}."
    )


def _hf_arrow_files(directory: Path) -> list[Path]:
    """The ``.arrow`` files a ``save_to_disk`` directory's ``state.json`` lists, in its order."""
    state_path = directory / _HF_STATE
    fix = ("write the dataset again with datasets.Dataset.save_to_disk, or copy the whole "
           "directory again")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        entries = state["_data_files"]
        names = [entry["filename"] for entry in entries]
    except OSError as err:
        raise DataError(f"{state_path}: cannot read ({err.strerror or err}); check its permissions") from None
    except (ValueError, KeyError, TypeError) as err:
        what = f"invalid JSON ({err})" if isinstance(err, ValueError) else "no '_data_files' list of {'filename': ...}"
        raise DataError(
            f"{state_path}: not the state.json of a Hugging Face dataset: {what}; {fix}."
        ) from None
    if not names:
        raise DataError(f"{state_path}: lists no data files ('_data_files' is empty); {fix}.")
    paths = []
    for name in names:
        if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".arrow"):
            raise DataError(
                f"{state_path}: unexpected data file entry {name!r} (expected a '.arrow' file name "
                f"in the same directory); {fix}."
            )
        path = directory / name
        if not path.is_file():
            raise DataError(
                f"{path}: listed in {state_path} but missing, so the dataset is incomplete; {fix}."
            )
        paths.append(path)
    return paths


def _refuse_hf_metadata(path: Path) -> None:
    """A DataError for a Hugging Face dataset's metadata file given as (or matched as) an input:
    it is JSON, but not data."""
    parent = path.parent
    if path.name in (_HF_STATE, _HF_INFO) and _is_hf_dataset(parent):
        raise DataError(
            f"{path}: metadata of the Hugging Face dataset {parent}, not data; pass the dataset "
            f"directory {parent} instead (its .arrow files are read in the order {_HF_STATE} lists)."
        )
    if path.name == _HF_DICT:
        _refuse_dataset_dict(parent)


def _add_hf_dataset(out: _Expansion, directory: Path, prefix: str, given: str, *,
                    once: bool = False, report_others: bool = False) -> None:
    arrows = _hf_arrow_files(directory)
    for path in arrows:
        out.add(path, f"{prefix}/{path.name[:-len('.arrow')]}", "arrow", None, given, once=once)
    if report_others:  # files inside the dataset directory that are not its data (caches, ...)
        listed = {p.name for p in arrows} | {_HF_STATE, _HF_INFO}
        for entry in sorted(os.listdir(directory)):
            if not entry.startswith(".") and entry not in listed and (directory / entry).is_file():
                out.ignored.append(directory / entry)


def _walk(out: _Expansion, directory: Path, base: Path, given: str, *, once: bool,
          ancestors: frozenset[str]) -> None:
    """Add the supported files below ``directory`` (names relative to ``base``), depth first in
    name order; hidden entries are skipped, other files are reported as ignored."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as err:
        raise DataError(
            f"{directory}: cannot list the directory ({err.strerror or err}); check its permissions"
        ) from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = directory / entry.name
        if entry.is_dir():
            real = os.path.realpath(path)
            if real in ancestors:  # a symlink back up the tree
                continue
            relative = _posix(os.path.relpath(path, base))
            if _is_hf_dataset(path):
                _add_hf_dataset(out, path, relative, given, once=once, report_others=True)
            elif (path / _HF_DICT).is_file():
                _refuse_dataset_dict(path)
            else:
                _walk(out, path, base, given, once=once, ancestors=ancestors | {real})
        elif entry.is_file():
            split = _split_name(entry.name)
            if split is None:
                out.ignored.append(path)
                continue
            stem, fmt, compression = split
            out.add(path, _strip(_posix(os.path.relpath(path, base)), stem), fmt, compression,
                    given, once=once)
        else:  # a broken symlink, a socket, ...
            out.ignored.append(path)


def _add_directory(out: _Expansion, directory: Path, base: Path, given: str, *, once: bool,
                   direct: bool) -> None:
    """A directory argument (``direct``) or a directory a glob matched (names relative to base)."""
    if _is_hf_dataset(directory):
        prefix = "." if direct else _posix(os.path.relpath(directory, base))
        if prefix == ".":  # given directly (or a pattern like DIR/** matched DIR itself)
            prefix = directory.resolve().name
        _add_hf_dataset(out, directory, prefix, given, once=once)
        return
    if (directory / _HF_DICT).is_file():
        _refuse_dataset_dict(directory)
    before, ignored_before = len(out.sources), len(out.ignored)
    _walk(out, directory, base, given, once=once,
          ancestors=frozenset({os.path.realpath(directory)}))
    if len(out.sources) == before and direct:
        ignored = out.ignored[ignored_before:]
        found = (f"it holds only {len(ignored)} file(s) with other suffixes, e.g. "
                 f"{', '.join(str(p.relative_to(directory)) for p in ignored[:3])}"
                 if ignored else "it holds no files (hidden entries are skipped)")
        raise DataError(
            f"{directory}: no input files found in the directory; {found}. Inputs are "
            f"{_SUPPORTED_TEXT}; pass another directory or the files themselves."
        )


def _glob_base(pattern: str) -> str:
    """The longest leading directory of ``pattern`` without glob characters."""
    head = []
    for part in pattern.split(os.sep):
        if _MAGIC.search(part):
            break
        head.append(part)
    else:  # no magic at all (not reached: callers check)
        head = head[:-1]
    if head == [""]:  # an absolute pattern like /*.jsonl
        return os.sep
    return os.sep.join(head) or os.curdir


def _add_glob(out: _Expansion, pattern: str) -> None:
    matches = sorted(glob.glob(pattern, recursive=True))
    if not matches:
        raise DataError(
            f"{pattern}: the pattern matches no files (hidden files never match). Check the "
            "pattern and the working directory; quote it on the command line so that "
            "megatron-tst, not the shell, expands it ('**' matches any depth)."
        )
    base = Path(_glob_base(pattern))
    before = len(out.sources)
    for match in matches:
        path = Path(match)
        if path.is_dir():
            _add_directory(out, path, base, pattern, once=True, direct=False)
        elif path.is_file():
            _refuse_hf_metadata(path)
            stem, fmt, compression = _file_format(path)
            out.add(path, _strip(_posix(os.path.relpath(path, base)), stem), fmt, compression,
                    pattern, once=True)
        else:
            raise DataError(f"{path}: matched by {pattern!r} but not a regular file or directory; "
                            "narrow the pattern")
    if len(out.sources) == before:
        raise DataError(
            f"{pattern}: the pattern matches only directories without input files "
            f"({', '.join(matches[:3])}). Inputs are {_SUPPORTED_TEXT}."
        )


def expand_inputs(inputs: Sequence[Union[str, Path]]) -> ExpandedInputs:
    """The sources of ``inputs`` (files, directories, glob patterns), in the order given, each
    input's expansion sorted. Raises :class:`DataError` for a missing path, an unsupported file, a
    pattern matching nothing, a directory without input files, a Hugging Face ``DatasetDict``, a
    file reached twice, or two sources with the same output name."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataError("no inputs given: pass at least one file, directory or glob pattern")
    out = _Expansion()
    for index, item in enumerate(inputs):
        out.input_index = index
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            _add_directory(out, path, path, text, once=False, direct=True)
        elif path.is_file():
            _refuse_hf_metadata(path)
            stem, fmt, compression = _file_format(path)
            out.add(path, stem, fmt, compression, text)
        elif path.exists():
            raise DataError(f"{path}: not a regular file or directory; pass data files, "
                            "directories of them, or a glob pattern")
        elif _MAGIC.search(text):
            _add_glob(out, text)
        else:
            raise DataError(f"{path}: input file not found; check the path (and the working directory)")
    ignored = list(dict.fromkeys(out.ignored))  # a recursive glob may walk a directory twice
    return ExpandedInputs(sources=out.sources, ignored=ignored)


# --------------------------------------------------------------------------------------------------
# Reading text: .jsonl / .json / .txt, optionally .gz / .bz2 / .zst
# --------------------------------------------------------------------------------------------------
class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame in ``raw``, decoded by ``zstandard``.

    ``ZstdDecompressor().stream_reader`` returns a clean EOF when the input stops in the middle of
    a frame (a truncated download reads as a shorter file), so frames are decoded with one
    ``decompressobj`` each: input that ends while a frame is open raises EOFError, like gzip.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        import zstandard

        super().__init__()
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None  # the decompressobj of the frame being decoded, None between frames
        self._pending = b""
        self._offset = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(data))
            if self._frame.eof:  # frame complete; what follows starts the next one
                data = self._frame.unused_data
                self._frame = None
            else:
                data = b""
        return b"".join(out)

    def readinto(self, buffer: Any) -> int:
        while self._offset >= len(self._pending):
            if self._done:
                return 0
            data = self._raw.read(_ZSTD_READ_BYTES)
            if not data:
                self._done = True
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame: truncated")
                return 0
            self._pending, self._offset = self._decompress(data), 0
        size = min(len(buffer), len(self._pending) - self._offset)
        buffer[:size] = self._pending[self._offset:self._offset + size]
        self._offset += size
        return size

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


def _open_binary(path: Path, compression: Optional[str]) -> tuple[IO[bytes], tuple[type, ...]]:
    """(binary stream of the decompressed file, exceptions that mean unreadable data)."""
    errors: tuple[type, ...] = (OSError, EOFError)
    if compression == ".gz":
        return gzip.open(path, "rb"), errors
    if compression == ".bz2":
        return bz2.open(path, "rb"), errors
    if compression == ".zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading '.zst' files needs the zstandard package; "
                            "`pip install zstandard`") from None
        raw = open(path, "rb")
        try:
            return io.BufferedReader(_ZstdFrames(raw), 1 << 16), errors + (zstandard.ZstdError,)
        except BaseException:
            raw.close()
            raise
    return open(path, "rb"), errors


def _decoded_lines(path: Path, compression: Optional[str]) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline), failing with a DataError on bad bytes."""
    errors: tuple[type, ...] = (OSError, EOFError)
    try:
        stream, errors = _open_binary(path, compression)
        with stream as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{path}:{lineno}: not valid UTF-8 (byte {raw[err.start:err.start + 1]!r} at "
                        f"column {err.start + 1}). Re-encode the file as UTF-8, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path.name}`."
                    ) from None
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]  # UTF-8 byte order mark
                yield lineno, line.rstrip("\r\n")
    except errors as err:
        fix = "Check that the file is complete and matches its suffix."
        if compression == ".zst" and "too much memory" in str(err):
            fix = (f"The file was compressed with a window over 128 MiB (zstd --long); decompress "
                   f"it with `zstd -d --long=31 {path.name}` and pass the result, or recompress "
                   "it without --long.")
        raise DataError(
            f"{path}: cannot read {'compressed ' if compression else ''}data ({err}). {fix}"
        ) from None


def _jsonl_documents(path: Path, compression: Optional[str], text_key: str,
                     counter: DocumentCounter) -> Iterator[str]:
    json_hint = (" A '.json' file is read as JSON Lines too: convert a JSON array with "
                 f"`jq -c '.[]' {path.name}` into a '.jsonl' file."
                 if ".json" in path.name.lower() and ".jsonl" not in path.name.lower() else "")
    for lineno, line in _decoded_lines(path, compression):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno}). Each line of a "
                ".jsonl or .json file must be one complete JSON object (both are read as JSON "
                f"Lines); plain text belongs in a '.txt' file.{json_hint}"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path}:{lineno}: expected a JSON object like {{\"{text_key}\": \"...\"}}, "
                f"got {type(record).__name__}.{json_hint}"
            )
        if text_key not in record:
            keys = ", ".join(repr(k) for k in list(record)[:10]) or "none"
            raise DataError(
                f"{path}:{lineno}: no {text_key!r} key in the JSON object (keys: {keys}). "
                "Pass the right key with --text-key / text_key=."
            )
        text = record[text_key]
        if not isinstance(text, str):
            raise DataError(
                f"{path}:{lineno}: the {text_key!r} value must be a string, got {type(text).__name__}; "
                "fix the record or pass the key of the text with --text-key / text_key=."
            )
        if not text.strip():
            counter.skipped += 1
            continue
        counter.documents += 1
        yield text


def _txt_documents(path: Path, compression: Optional[str], counter: DocumentCounter) -> Iterator[str]:
    lines: list[str] = []
    for _, line in _decoded_lines(path, compression):
        if line.strip():
            lines.append(line)
        elif lines:
            counter.documents += 1
            yield "\n".join(lines)
            lines = []
    if lines:
        counter.documents += 1
        yield "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Reading columns: .parquet and .arrow
# --------------------------------------------------------------------------------------------------
def _import_pyarrow(path: Path) -> Any:
    try:
        import pyarrow
    except ImportError:
        raise DataError(f"{path}: reading Parquet and Arrow files needs the pyarrow package; "
                        "`pip install pyarrow`") from None
    return pyarrow


def _is_string_type(pa: Any, dtype: Any) -> bool:
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or is_view(dtype)


def _check_column(path: Path, schema: Any, text_key: str, pa: Any) -> None:
    names = list(schema.names)
    if text_key not in names:
        shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
        raise DataError(
            f"{path}: no {text_key!r} column (columns: {shown or 'none'}). Pass the column that "
            "holds the text with --text-key / text_key=."
        )
    dtype = schema.field(text_key).type
    if not _is_string_type(pa, dtype):
        raise DataError(
            f"{path}: the {text_key!r} column has type {dtype}, not string. Pass the column that "
            "holds the text with --text-key / text_key=, or convert it to strings."
        )


def _column_documents(path: Path, values: list, first_row: int, where: str, text_key: str,
                      counter: DocumentCounter) -> Iterator[str]:
    for i, text in enumerate(values):
        if not isinstance(text, str):
            got = "null" if text is None else type(text).__name__
            raise DataError(
                f"{path}: row {first_row + i} ({where}, counting from 0): the {text_key!r} value is "
                f"{got}, not a string. Drop or fill the rows without text (e.g. "
                f"`dataset.filter(lambda r: r[{text_key!r}] is not None)`), or pass another "
                "column with --text-key / text_key=."
            )
        if not text.strip():
            counter.skipped += 1
            continue
        counter.documents += 1
        yield text


def _parquet_documents(path: Path, text_key: str, counter: DocumentCounter) -> Iterator[str]:
    pa = _import_pyarrow(path)
    import pyarrow.parquet as pq

    fix = ("Check that the file is complete (an interrupted download leaves it truncated) and "
           "really is Parquet; download or write it again.")
    try:
        parquet = pq.ParquetFile(str(path))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err}). {fix}") from None
    with parquet:
        _check_column(path, parquet.schema_arrow, text_key, pa)
        row = 0
        for group in range(parquet.num_row_groups):
            batches = parquet.iter_batches(
                batch_size=_PARQUET_BATCH_ROWS, row_groups=[group], columns=[text_key]
            )
            row = yield from _batch_documents(path, batches, 0, lambda _: f"row group {group}",
                                              row, text_key, counter, pa, fix)


def _batch_documents(path: Path, batches: Iterator[Any], column: int, where: Callable[[int], str],
                     row: int, text_key: str, counter: DocumentCounter, pa: Any,
                     fix: str) -> Iterator[str]:
    """The documents of Arrow record batches, one batch in memory at a time; ``where(i)`` names
    batch ``i`` in errors ("row group 3"), ``row`` is the first row's number. Returns the row
    after the last."""
    for number in itertools.count():
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: cannot read {where(number)} (rows from {row}, counting "
                            f"from 0): {err}. {fix}") from None
        if batch is None:
            return row
        values = batch.column(column).to_pylist()
        yield from _column_documents(path, values, row, where(number), text_key, counter)
        row += len(values)
    raise AssertionError("unreachable")  # pragma: no cover


def _open_arrow(path: Path, pa: Any) -> Any:
    """A reader over the record batches of an Arrow IPC stream (what ``save_to_disk`` writes) or
    Arrow IPC file; memory-mapped, so batches are not copied into memory."""
    import pyarrow.ipc

    fix = ("Check that the file is complete and was written by datasets' save_to_disk or "
           "pyarrow.ipc; write or copy it again.")
    try:
        source = pa.memory_map(str(path))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read the file ({err}). {fix}") from None
    try:
        return pyarrow.ipc.open_stream(source)
    except (pa.ArrowException, OSError) as stream_err:
        try:
            source.seek(0)
            reader = pyarrow.ipc.open_file(source)
        except (pa.ArrowException, OSError):
            source.close()
            raise DataError(f"{path}: not readable as Arrow IPC stream or file data "
                            f"({stream_err}). {fix}") from None
        return _FileBatches(reader)


class _FileBatches:
    """Iterate an Arrow IPC *file* reader's batches like a stream reader's."""

    def __init__(self, reader: Any) -> None:
        self.schema = reader.schema
        self._reader = reader

    def __iter__(self) -> Iterator[Any]:
        for i in range(self._reader.num_record_batches):
            yield self._reader.get_batch(i)


def _arrow_documents(path: Path, text_key: str, counter: DocumentCounter) -> Iterator[str]:
    pa = _import_pyarrow(path)
    reader = _open_arrow(path, pa)
    _check_column(path, reader.schema, text_key, pa)
    yield from _batch_documents(path, iter(reader), reader.schema.get_field_index(text_key),
                                lambda number: f"record batch {number}", 0, text_key, counter,
                                pa, "Check that the file is complete; write or copy it again.")


# --------------------------------------------------------------------------------------------------
# One source
# --------------------------------------------------------------------------------------------------
def read_documents(source: Source, text_key: str = "text",
                   counter: Optional[DocumentCounter] = None) -> Iterator[str]:
    """Stream the non-empty documents of ``source`` in order (empty or whitespace-only ones are
    counted in ``counter.skipped``). Raises :class:`DataError` for bad input, and at the end for
    a source that holds no document."""
    counter = counter if counter is not None else DocumentCounter()
    before_docs, before_skipped = counter.documents, counter.skipped
    path = source.path
    if source.format == "jsonl":
        yield from _jsonl_documents(path, source.compression, text_key, counter)
    elif source.format == "txt":
        yield from _txt_documents(path, source.compression, counter)
    elif source.format == "parquet":
        yield from _parquet_documents(path, text_key, counter)
    elif source.format == "arrow":
        yield from _arrow_documents(path, text_key, counter)
    else:
        raise ValueError(f"unknown source format {source.format!r}")
    if counter.documents == before_docs:
        skipped = counter.skipped - before_skipped
        if skipped:
            what = f"all {skipped} {text_key!r} values are empty"
        elif source.format in ("parquet", "arrow"):
            what = "the file holds no rows"
        else:
            what = "the file is empty or holds only blank lines"
        raise DataError(f"{path}: no documents found ({what}). Remove it from the inputs or fix it.")
