"""A recipe's ``data.train_paths`` / ``data.valid_paths`` as indexed datasets and weights.

Each entry of the lists is one of:

* a **prefix** (``data/web``: ``data/web.bin`` + ``data/web.idx``), as before;
* a **directory written by** ``megatron-tst preprocess --output-dir DIR`` (it holds
  ``manifest.json``, :mod:`megatron_tst.data.manifest`), or the path of that manifest: in
  ``train_paths`` all its shards, in ``valid_paths`` its held-out set (``manifest.valid``);
* a **directory of indexed datasets made by other tools** (Megatron-LM's ``preprocess_data.py``):
  every ``*.idx`` below it (recursively, in sorted order) whose ``.bin`` is there.

A directory with ``preprocess.json`` and no manifest is a preprocess that has not finished: an
error, never a partial blend.

**Weights.** When every training entry is a prefix, the weights are ``data.train_weights`` as given
(or none: megatron reads each dataset once). When any entry is a directory or a manifest, every
dataset gets a weight: entry ``i``'s weight ``w_i`` is split over its datasets in proportion to
their tokens (``w_i * tokens / tokens of the entry``), so ``train_weights: [0.5, 0.5]`` over two
sources means half the samples from each whatever their shard counts; without
``train_weights``, each dataset's weight is its token count (the natural mixture). Validation
datasets are never weighted.

**Checks.** :func:`resolve_blend` reads every ``.idx``
(:func:`~megatron_tst.data.checks.read_index`, with the sample of
:func:`~megatron_tst.data.checks.token_sample` for that many files), a manifest shard's tokens
must be what the manifest lists, and the recipe's tokenizer file must be the one a manifest was
made with (its sha256). Errors name the recipe key of the entry (``data.train_paths[1]``) and the
shard (``shard 12 of data/dclm (data/dclm/shards/x_text_document)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from megatron_tst.data.checks import (DataSource, IndexedFiles, TokenSample, read_index,
                                      token_sample)
from megatron_tst.data.errors import DataError
from megatron_tst.data.manifest import MANIFEST_NAME, SETTINGS_NAME, Manifest, read_manifest

__all__ = ["Blend", "Entry", "expand_entry", "resolve_blend", "shard_weights"]

PREFIX, MANIFEST, DIRECTORY = "prefix", "manifest", "directory"


@dataclass(frozen=True)
class Entry:
    """One entry of a recipe's path list and the indexed datasets it stands for."""

    source: DataSource  # the entry as the recipe gives it (prefix: the path, key: its key)
    kind: str  # PREFIX, MANIFEST or DIRECTORY
    datasets: tuple[DataSource, ...]
    #: The manifest's token count of each dataset (None: not from a manifest).
    listed_tokens: tuple[Optional[int], ...] = ()
    manifest: Optional[Manifest] = None

    @property
    def expanded(self) -> bool:
        return self.kind != PREFIX


@dataclass(frozen=True)
class Blend:
    """The indexed datasets of a run, read and checked, and megatron's weights for them."""

    train: tuple[IndexedFiles, ...]
    train_weights: Optional[tuple[float, ...]]  # one per train dataset, or None
    valid: tuple[IndexedFiles, ...]
    train_entries: tuple[Entry, ...]
    valid_entries: tuple[Entry, ...]
    sample: TokenSample  # the token-id sample per file for this many files

    @property
    def train_prefixes(self) -> list[str]:
        return [f.source.prefix for f in self.train]

    @property
    def valid_prefixes(self) -> list[str]:
        return [f.source.prefix for f in self.valid]

    @property
    def manifests(self) -> list[Manifest]:
        """The manifests the recipe reads (each once)."""
        seen: dict[Path, Manifest] = {}
        for entry in self.train_entries + self.valid_entries:
            if entry.manifest is not None:
                seen.setdefault(entry.manifest.directory, entry.manifest)
        return list(seen.values())


# ------------------------------------------------------------------------------------ expanding
def _fail(source: DataSource, message: str) -> DataError:
    return DataError(message, key=source.key, value=source.value)


def _kind(path: str) -> str:
    """What an entry is, from the file system (a few ``stat``s)."""
    if os.path.exists(path + ".idx") or os.path.exists(path + ".bin"):
        return PREFIX  # a prefix wins, also where a directory of the same name exists
    if os.path.isdir(path):
        return MANIFEST if os.path.isfile(os.path.join(path, MANIFEST_NAME)) else DIRECTORY
    if path.endswith(".json"):
        return MANIFEST
    return PREFIX


def _read_manifest(source: DataSource, cache: Optional[dict]) -> Manifest:
    path = source.prefix
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    path = os.path.normpath(path)
    if cache is not None and path in cache:
        return cache[path]
    try:
        manifest = read_manifest(source.prefix)
    except DataError as err:  # it names the file and the fix; add the recipe key
        raise _fail(source, err.message) from None
    if cache is not None:
        cache[path] = manifest
    return manifest


def _manifest_entry(source: DataSource, valid: bool, cache: Optional[dict]) -> Entry:
    manifest = _read_manifest(source, cache)
    where = manifest.directory / MANIFEST_NAME
    if valid:
        v = manifest.valid
        if v is None:
            raise _fail(source, (
                f"{where} has no held-out validation set (it was written without "
                f"--valid-fraction or --valid-documents), so {source.prefix} gives no validation "
                f"data; re-run `megatron-tst preprocess --output-dir {manifest.directory} ...` "
                f"with `--valid-fraction F` or `--valid-documents N`, or name a validation prefix "
                f"in {source.key.partition('[')[0]}"))
        path = manifest.path_of(v.prefix)
        label = f"the held-out validation set of {source.prefix} ({path})"
        return Entry(source, MANIFEST, (DataSource(path, source.key, label, source.prefix),),
                     (v.tokens,), manifest)
    if not manifest.shards:
        raise _fail(source, (
            f"{where} lists no shards: its inputs gave no training documents; give "
            f"`megatron-tst preprocess --output-dir` inputs with documents, or remove "
            f"{source.prefix} from {source.key.partition('[')[0]}"))
    datasets = tuple(
        DataSource(path, source.key, f"shard {j} of {source.prefix} ({path})", source.prefix)
        for j, path in enumerate(manifest.path_of(s.prefix) for s in manifest.shards))
    return Entry(source, MANIFEST, datasets, tuple(s.tokens for s in manifest.shards), manifest)


def _directory_entry(source: DataSource) -> Entry:
    directory = Path(source.prefix)
    if (directory / SETTINGS_NAME).is_file():
        raise _fail(source, (
            f"{directory} is an unfinished `megatron-tst preprocess --output-dir`: it has "
            f"{SETTINGS_NAME} but no {MANIFEST_NAME}, which preprocess writes last, once every "
            f"shard is done; finish it: run `megatron-tst preprocess ... --output-dir {directory}` "
            f"again with the same inputs (finished shards are kept), or `megatron-tst preprocess "
            f"--merge ... --output-dir {directory}` once every task of a Slurm array has ended"))
    try:
        found = sorted(str(p)[:-len(".idx")] for p in directory.rglob("*.idx") if p.is_file())
    except OSError as err:
        raise _fail(source, f"cannot list {directory} ({err.strerror or err})") from None
    prefixes = [p for p in found if os.path.isfile(p + ".bin")]
    if not prefixes:
        half = (f" ({len(found)} .idx files, none with its .bin)" if found else "")
        raise _fail(source, (
            f"{directory} is a directory with no indexed datasets: no {MANIFEST_NAME} (written by "
            f"`megatron-tst preprocess --output-dir`) and no .idx/.bin pairs below it{half}; give "
            f"a directory written by preprocess, a directory of .bin/.idx files, or a prefix"))
    datasets = tuple(DataSource(p, source.key, f"shard {j} of {source.prefix} ({p})",
                                source.prefix) for j, p in enumerate(prefixes))
    return Entry(source, DIRECTORY, datasets, (None,) * len(datasets))


def expand_entry(source: DataSource, *, valid: bool = False,
                 manifests: Optional[dict] = None) -> Entry:
    """The datasets of one recipe entry (``source.prefix`` is the path the recipe gives, and
    ``source.key`` its key): listed, not read (a manifest is read, no ``.idx``). ``valid``: an
    entry of ``data.valid_paths`` (a manifest gives its held-out set). ``manifests``: a cache
    of the manifests read (path -> Manifest), for entries that name one twice."""
    kind = _kind(source.prefix)
    if kind == MANIFEST:
        return _manifest_entry(source, valid, manifests)
    if kind == DIRECTORY:
        return _directory_entry(source)
    return Entry(source, PREFIX, (source,), (None,))


# ------------------------------------------------------------------------------------- weights
def shard_weights(tokens: Sequence[Sequence[int]],
                  weights: Optional[Sequence[float]]) -> list[float]:
    """One weight per dataset of a blend whose entry ``i`` holds datasets of ``tokens[i]`` tokens:
    entry ``i``'s weight split over its datasets in proportion to their tokens, so the entries'
    shares stay ``weights``; without ``weights``, each dataset's token count."""
    out: list[float] = []
    for i, counts in enumerate(tokens):
        total = sum(counts)
        if weights is None:
            out.extend(float(t) for t in counts)
        elif total > 0:
            out.extend(float(weights[i]) * t / total for t in counts)
        else:  # no tokens at all: the split checks refuse it; share the weight evenly meanwhile
            out.extend(float(weights[i]) / len(counts) for _ in counts)
    return out


# ------------------------------------------------------------------------------------ resolving
def _check_tokenizer(entry: Entry, tokenizer_file: Path, tokenizer_path: str,
                     sha_of_file: dict) -> None:
    manifest = entry.manifest
    if manifest is None:
        return
    if "sha" not in sha_of_file:
        from megatron_tst.data.tokenizer_files import file_sha256

        try:
            sha_of_file["sha"] = file_sha256(tokenizer_file)
        except OSError as err:
            raise DataError(f"cannot read the tokenizer file {tokenizer_file} "
                            f"({err.strerror or err})", key="data.tokenizer.path",
                            value=tokenizer_path) from None
    made_with = manifest.tokenizer
    if sha_of_file["sha"] == made_with.sha256:
        return
    where = manifest.directory / MANIFEST_NAME
    raise DataError(
        f"{entry.source.key}={entry.source.prefix!r} was made with another tokenizer: {where} "
        f"names {made_with.path} ({made_with.kind}, {made_with.vocab_size:,} entries, sha256 "
        f"{made_with.sha256[:12]}...), and the recipe's tokenizer is {tokenizer_file} (sha256 "
        f"{sha_of_file['sha'][:12]}...), so the token ids would mean other text; point "
        f"data.tokenizer.path at the tokenizer the data was made with ({made_with.path}), or "
        f"re-run `megatron-tst preprocess` with this tokenizer into a new directory",
        key="data.tokenizer.path", value=tokenizer_path)


def _read(entry: Entry, sample: TokenSample) -> list[IndexedFiles]:
    files = []
    where = entry.manifest.directory / MANIFEST_NAME if entry.manifest else None
    listed_tokens = entry.listed_tokens or (None,) * len(entry.datasets)
    for source, listed in zip(entry.datasets, listed_tokens):
        try:
            f = read_index(source, sample=sample)
        except DataError as err:
            if where is None:
                raise
            raise DataError(f"{err.message} ({source.name}, listed in {where}: copy the whole "
                            f"directory again, or re-run `megatron-tst preprocess --output-dir "
                            f"{entry.manifest.directory} ...` with the same inputs)",
                            key=err.key, value=err.value) from None
        if listed is not None and f.num_tokens != listed:
            raise _fail(source, (
                f"{source.name} has {f.num_tokens:,} tokens but {where} lists {listed:,}: the "
                f"shard changed after the manifest was written (another preprocess wrote into "
                f"the directory, or files of another run were copied over it); re-run "
                f"`megatron-tst preprocess --output-dir {entry.manifest.directory} ...`, into a "
                f"new directory if its inputs changed"))
        files.append(f)
    return files


def resolve_blend(train: Sequence[DataSource], valid: Sequence[DataSource],
                  weights: Optional[Sequence[float]] = None, *,
                  tokenizer_file: Optional[str | Path] = None,
                  tokenizer_path: Optional[str] = None) -> Blend:
    """Expand the entries ``train`` / ``valid`` (one :class:`DataSource` per recipe entry: its
    path and key), read and check every index, and give megatron's weights.

    ``weights``: ``data.train_weights`` (one per train entry) or None. ``tokenizer_file``: the
    recipe's tokenizer file (resolved: an HF directory's ``tokenizer.json``), compared with every
    manifest's; ``tokenizer_path``: how the recipe names it (for the error). Raises
    :class:`DataError` naming the entry's key."""
    if weights is not None and len(weights) != len(train):
        raise ValueError(f"{len(weights)} weights for {len(train)} train entries")
    manifests: dict = {}
    train_entries = [expand_entry(s, manifests=manifests) for s in train]
    valid_entries = [expand_entry(s, valid=True, manifests=manifests) for s in valid]
    if tokenizer_file is not None:
        sha: dict = {}
        for entry in train_entries + valid_entries:
            _check_tokenizer(entry, Path(tokenizer_file), tokenizer_path or str(tokenizer_file),
                             sha)
    sample = token_sample(sum(len(e.datasets) for e in train_entries + valid_entries))
    train_files = [_read(e, sample) for e in train_entries]
    valid_files = [f for e in valid_entries for f in _read(e, sample)]
    if any(e.expanded for e in train_entries):
        train_weights = tuple(shard_weights([[f.num_tokens for f in group]
                                             for group in train_files], weights))
    else:
        train_weights = tuple(float(w) for w in weights) if weights is not None else None
    return Blend(train=tuple(f for group in train_files for f in group),
                 train_weights=train_weights, valid=tuple(valid_files),
                 train_entries=tuple(train_entries), valid_entries=tuple(valid_entries),
                 sample=sample)
