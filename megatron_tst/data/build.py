"""Tokenizer and datasets for a run, from ``cfg.data``.

``data.source: demo`` prepares the bundled corpus (rank 0, cached under ``<run_dir>/data``);
``data.source: indexed`` reads indexed datasets written by ``megatron-tst preprocess``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_tst.config import ConfigError, RunConfig
from megatron_tst.data.datasets import build_gpt_datasets


@dataclass
class RunData:
    tokenizer: object
    train: object  # GPTDataset (or blend)
    valid: object


def resolve_data_paths(cfg: RunConfig) -> tuple[str, list[str], list[str]]:
    """(tokenizer path, train prefixes, valid prefixes); prepares the demo corpus if asked."""
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


def build_run_data(cfg: RunConfig, *, sequence_length: int, num_train_samples: int,
                   num_valid_samples: int) -> RunData:
    from megatron_tst.data.tokenizer import load_tokenizer

    tok_path, train_paths, valid_paths = resolve_data_paths(cfg)
    kind = "sentencepiece" if cfg.data.source == "demo" else cfg.data.tokenizer.type
    if not Path(tok_path).is_file():
        raise ConfigError(f"tokenizer file {tok_path} not found", key="data.tokenizer.path",
                          value=tok_path)
    options = {"eod_token": cfg.data.tokenizer.eod_token} if kind == "huggingface" else {}
    tokenizer = load_tokenizer(kind, tok_path, **options)
    train, valid = build_gpt_datasets(
        train_paths=train_paths, train_weights=cfg.data.train_weights, valid_paths=valid_paths,
        tokenizer=tokenizer, sequence_length=sequence_length, seed=cfg.seed,
        num_train_samples=num_train_samples, num_valid_samples=num_valid_samples,
        cache_dir=str(Path(cfg.resolved_run_dir) / "cache"))
    return RunData(tokenizer, train, valid)
