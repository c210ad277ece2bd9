"""Tokenizer and datasets for a run, from ``cfg.data``, checked before megatron-core reads them.

``data.source: demo`` prepares the bundled corpus (rank 0, cached under ``<run_dir>/data``);
``data.source: indexed`` reads indexed datasets written by ``megatron-tst preprocess``: each entry
of ``data.train_paths`` / ``data.valid_paths`` is a prefix, a directory written by ``preprocess
--output-dir`` (or its ``manifest.json``), or a directory of ``.bin``/``.idx`` files;
``megatron_tst.data.blend`` expands them into datasets and megatron's weights.

``check_run_data(cfg, stream)`` runs every check of the tokenizer and the indexed datasets that needs
neither a process group nor megatron-core (``megatron_tst.data.checks``): ``megatron-tst train``
calls it first, so bad data fails in about a second, before the run starts. ``build_run_data``
runs the same checks (for runs started from Python, and for the demo corpus), builds megatron's
datasets, checks their sizes, and checks the token ids of every sample it hands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.config.loader import config_source
from megatron_tst.data.blend import Blend, resolve_blend
from megatron_tst.data.checks import (VALID_SPLIT, DataSource, IndexedFiles, SampleShape,
                                      SplitPart, check_split, check_token_ids, split_bounds)
from megatron_tst.data.errors import DataError
from megatron_tst.data.stream import DataStream


@dataclass
class RunData:
    tokenizer: object
    train: object  # GPTDataset (or blend), wrapped in a TokenIdCheck
    valid: object


def resolve_data_paths(cfg: RunConfig) -> tuple[str, list[str], list[str]]:
    """(tokenizer path, train entries, valid entries) as the recipe gives them (prefixes,
    directories or manifests: :func:`megatron_tst.data.blend.resolve_blend` expands them); the
    demo corpus's prefixes, prepared if need be, when ``data.source=demo``."""
    import torch.distributed as dist

    d = cfg.data
    if d.source == "indexed":
        return d.tokenizer.path, list(d.train_paths), list(d.valid_paths)
    from megatron_tst.data.demo import prepare_demo_data

    cache = Path(cfg.resolved_run_dir) / "data"
    if dist.get_rank() == 0:
        prepare_demo_data(cache, vocab_size=d.demo_vocab_size, seed=cfg.seed)
    dist.barrier()
    demo = prepare_demo_data(cache, vocab_size=d.demo_vocab_size, seed=cfg.seed)  # cached: instant
    return str(demo.tokenizer_path), [str(demo.train_prefix)], [str(demo.valid_prefix)]


# ----------------------------------------------------------------------------------- tokenizer
def _sniff_tokenizer(path: Path) -> Optional[str]:
    """The tokenizer kind a file looks like (a hint for errors only), or None."""
    if path.is_dir():
        return "huggingface" if (path / "tokenizer.json").is_file() else None
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return None
    if head.lstrip()[:1] in (b"{", b"["):
        return "huggingface"
    if head[:1] == b"\x0a":  # protobuf field 1 (the pieces), length-delimited: a ModelProto
        return "sentencepiece"
    return None


def load_run_tokenizer(cfg: RunConfig, path: Optional[str] = None, *, light: bool = False):
    """The run's tokenizer; a missing, unreadable or wrong-kind file is a ``ConfigError`` that
    names ``data.tokenizer.path`` / ``.type`` / ``.eod_token`` and the fix. ``light``: open the
    file without megatron-core (a ``TokenizerFile``: vocab_size, eod, ...), for the checks."""
    if light:
        from megatron_tst.data.tokenizer_files import open_tokenizer as load_tokenizer
    else:
        from megatron_tst.data.tokenizer import load_tokenizer

    t = cfg.data.tokenizer
    demo = cfg.data.source == "demo"
    kind = "sentencepiece" if demo else t.type
    path = path if path is not None else t.path

    def fail(message: str, key: str = "data.tokenizer.path", value=path) -> ConfigError:
        return ConfigError(message, key=key, value=value, source=config_source(cfg, key))

    p = Path(path)
    if not p.exists():
        where = "" if p.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        wanted = ("a .model file" if kind == "sentencepiece"
                      else "a tokenizer.json or its directory")
        raise fail(f"tokenizer file {path} not found{where}; give the path of {wanted}")
    looks = _sniff_tokenizer(p)
    if p.is_dir() and kind == "sentencepiece":
        if looks == "huggingface":
            raise fail(f"{path} is a Hugging Face tokenizer directory, not a sentencepiece "
                       f".model; set data.tokenizer.type=huggingface", "data.tokenizer.type", kind)
        raise fail(f"{path} is a directory; give the sentencepiece .model file in it")
    if kind == "sentencepiece" and p.suffix == ".vocab" and p.with_suffix(".model").is_file():
        raise fail(f"{path} is sentencepiece's vocabulary listing, not the model; give "
                   f"{p.with_suffix('.model')}")
    options = {"eod_token": t.eod_token} if kind == "huggingface" and t.eod_token else {}
    try:
        return load_tokenizer(kind, path, **options)
    except ImportError as err:
        raise fail(f"{kind} tokenizers need a package that is not installed ({err}); "
                   f"pip install -e '.[hf]' (the tokenizers package)", "data.tokenizer.type",
                   kind) from None
    except (ValueError, OSError) as err:
        if looks is not None and looks != kind:
            raise fail(f"{path} is a {looks} tokenizer, not a {kind} one; set "
                       f"data.tokenizer.type={looks}", "data.tokenizer.type", kind) from None
        if "eod_token" in str(err) or "end-of-document" in str(err):
            raise fail(f"{err} In a recipe: data.tokenizer.eod_token", "data.tokenizer.eod_token",
                       t.eod_token) from None
        raise fail(f"cannot load it as a {kind} tokenizer: {err}") from None


def run_tokenizer_vocab(cfg: RunConfig) -> tuple[int, str]:
    """(vocabulary size, name) of the run's tokenizer, known before anything is written: the
    demo tokenizer is trained to exactly ``data.demo_vocab_size`` pieces; an indexed run's
    tokenizer file is opened without megatron-core."""
    if cfg.data.source == "demo":
        return cfg.data.demo_vocab_size, "the demo tokenizer (data.demo_vocab_size)"
    return load_run_tokenizer(cfg, light=True).vocab_size, cfg.data.tokenizer.path


# ------------------------------------------------------------------------------------- checks
def _sources(cfg: RunConfig, paths: list[str], key: str) -> list[DataSource]:
    """One DataSource per entry of a recipe's path list (what it names, and its key)."""
    if cfg.data.source == "demo":
        return [DataSource(p, "data.source", f"the demo corpus ({p})") for p in paths]
    return [DataSource(p, f"{key}[{i}]") for i, p in enumerate(paths)]


def _split_parts(cfg: RunConfig, train: list[IndexedFiles], valid: list[IndexedFiles]):
    """(train parts, valid parts): whole datasets, or megatron's 98/2 split of each train one."""
    if valid:
        return ([SplitPart(f, 0, f.num_sequences, "the training data") for f in train],
                [SplitPart(f, 0, f.num_sequences, "the validation data") for f in valid])
    train_pct, valid_pct = VALID_SPLIT.split(",")[:2]
    train_parts, valid_parts = [], []
    for f in train:
        (a, b), (c, d), _ = split_bounds(f.num_sequences)
        ends = [i for i in (b - 1, d - 1) if i >= 0]
        begins = [i for i in (a, c) if i < f.num_sequences]
        f.load({"pointers": begins + ends, "lengths": ends})  # both parts' tokens: one open
        train_parts.append(SplitPart(f, a, b, f"the training split ({train_pct}%) of"))
        valid_parts.append(SplitPart(f, c, d, f"the validation split ({valid_pct}%) of"))
    return train_parts, valid_parts


def _check(cfg: RunConfig, stream: DataStream, tokenizer, tok_path: str,
           train_paths: list[str], valid_paths: list[str]) -> Blend:
    """Expand the entries into datasets and weights (``megatron_tst.data.blend``: every index
    read, manifests matched to the tokenizer), then check token ids and split sizes."""
    shape = SampleShape(stream.seq_length, stream.data_chunk, cfg.training.train_steps)
    try:
        blend = resolve_blend(_sources(cfg, train_paths, "data.train_paths"),
                              _sources(cfg, valid_paths, "data.valid_paths"),
                              cfg.data.train_weights,
                              tokenizer_file=getattr(tokenizer, "path", None),
                              tokenizer_path=tok_path)
        train, valid = list(blend.train), list(blend.valid)
        name = f"the tokenizer {tok_path}"
        for files in train + valid:
            check_token_ids(files, tokenizer.vocab_size, name, sample=blend.sample)
        train_parts, valid_parts = _split_parts(cfg, train, valid)
        check_split(train_parts, weights=blend.train_weights, num_samples=stream.train_chunks,
                    shape=shape, needs_all_samples=True,
                    size_fix="give data.train_weights (a weighted blend repeats each dataset as "
                             "needed), more data, or fewer training.train_steps")
        valid_fix = ("give fewer training.eval_steps, more validation data in data.valid_paths, "
                     "or set training.eval_interval=0" if valid else
                     "give a held-out dataset in data.valid_paths, or more documents")
        check_split(valid_parts, weights=None if valid else blend.train_weights,
                    num_samples=stream.valid_chunks, shape=shape,
                    needs_all_samples=cfg.training.eval_interval > 0, size_fix=valid_fix)
    except DataError as err:
        raise err.with_source(config_source(cfg, err.key)) from None
    return blend


def check_run_data(cfg: RunConfig, stream: DataStream) -> None:
    """Every data check that needs no process group: the tokenizer loads, the recipe's entries
    expand (directories, manifests), each indexed dataset is whole and made with the tokenizer,
    and each split can give the samples the run asks for. Indexed data only (the demo corpus is
    prepared, then checked, inside the run). Raises ``ConfigError`` or ``DataError``."""
    if cfg.data.source != "indexed":
        return
    tokenizer = load_run_tokenizer(cfg, light=True)
    _check(cfg, stream, tokenizer, cfg.data.tokenizer.path, list(cfg.data.train_paths),
           list(cfg.data.valid_paths))


def build_run_data(cfg: RunConfig, stream: DataStream) -> RunData:
    """The tokenizer and megatron's datasets of ``stream.chunk_tokens``-token samples, checked."""
    from megatron_tst.data.datasets import TokenIdCheck, build_gpt_datasets

    tok_path, train_paths, valid_paths = resolve_data_paths(cfg)
    tokenizer = load_run_tokenizer(cfg, tok_path)
    blend = _check(cfg, stream, tokenizer, tok_path, train_paths, valid_paths)
    sequence_length = stream.chunk_tokens
    num_train_samples, num_valid_samples = stream.train_chunks, stream.valid_chunks
    train, valid = build_gpt_datasets(
        train_paths=blend.train_prefixes, train_weights=blend.train_weights,
        valid_paths=blend.valid_prefixes,
        tokenizer=tokenizer, sequence_length=sequence_length, seed=cfg.seed,
        num_train_samples=num_train_samples, num_valid_samples=num_valid_samples,
        cache_dir=str(Path(cfg.resolved_run_dir) / "cache"))
    # What megatron built (the checks above predict it; this is the backstop).
    for split, dataset, needed, paths, key in (
            ("training", train, num_train_samples, train_paths, "data.train_paths"),
            ("validation", valid, num_valid_samples if cfg.training.eval_interval else 0,
             valid_paths or train_paths, "data.valid_paths" if valid_paths else "data.train_paths")):
        built = 0 if dataset is None else len(dataset)
        if built < needed:
            raise DataError(f"megatron built {built:,} {split} samples of {sequence_length:,} "
                            f"tokens from {', '.join(paths)}, and the run needs {needed:,}; give "
                            f"more data, data.train_weights, or fewer steps", key=key, value=paths,
                            source=config_source(cfg, key))
    name = f"the tokenizer {tok_path}"
    train = TokenIdCheck(train, tokenizer.vocab_size, split="training", tokenizer_name=name)
    if valid is not None:
        valid = TokenIdCheck(valid, tokenizer.vocab_size, split="validation", tokenizer_name=name)
    return RunData(tokenizer, train, valid)
