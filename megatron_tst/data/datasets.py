"""Train/validation samples from megatron-core ``GPTDataset`` and a resumable batch order.

Sample order is a pure function of the consumed-sample count: the global batch of step ``k`` is
samples ``[k*G, (k+1)*G)`` of the (megatron-shuffled) dataset, and data-parallel rank ``r`` takes
its contiguous share of it, split into micro-batches. Resuming therefore only needs the count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from megatron_tst.config import ConfigError
from megatron_tst.data.checks import BLEND_SURPLUS, VALID_SPLIT
from megatron_tst.data.errors import DataError


@dataclass(frozen=True)
class BatchLayout:
    """Who reads which samples: global batch, micro-batch, data-parallel rank and size."""

    global_batch_size: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def microbatch_indices(self, consumed_samples: int) -> list[list[int]]:
        """Dataset indices of this rank's micro-batches for the step starting at consumed_samples."""
        per_rank = self.global_batch_size // self.dp_size
        start = consumed_samples + self.dp_rank * per_rank
        mbs = self.micro_batch_size
        return [list(range(start + i * mbs, start + (i + 1) * mbs))
                for i in range(self.num_microbatches)]


def _blend(paths: Sequence[str], weights: Optional[Sequence[float]], key: str):
    """megatron's ``(prefixes, weights)`` of a blend of indexed datasets."""
    for prefix in paths:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                expand = (f"; {prefix} is a directory or a manifest: expand it into its datasets "
                          f"and weights first (megatron_tst.data.blend.resolve_blend, as "
                          f"build_run_data does)"
                          if Path(prefix).is_dir() or prefix.endswith(".json") else "")
                raise ConfigError(f"indexed dataset file {prefix + suffix} not found; give the "
                                  f"prefix written by `megatron-tst preprocess --output-prefix`"
                                  f"{expand}", key=key, value=prefix)
    if weights is not None and len(weights) != len(paths):
        raise ConfigError(f"{len(weights)} weights for {len(paths)} datasets: give one weight "
                          f"per dataset", key="data.train_weights", value=list(weights))
    return (list(paths), [float(w) for w in weights] if weights is not None else None)


def build_gpt_datasets(*, train_paths: Sequence[str], train_weights: Optional[Sequence[float]],
                       valid_paths: Sequence[str], tokenizer, sequence_length: int, seed: int,
                       num_train_samples: int, num_valid_samples: int, cache_dir: str):
    """(train, valid) megatron ``GPTDataset``s of ``sequence_length``-token samples.

    ``train_paths`` / ``valid_paths`` are prefixes (a recipe's directories and manifests expanded
    by :func:`megatron_tst.data.blend.resolve_blend`, which also gives ``train_weights``: one per
    prefix, or None). Validation uses ``valid_paths`` when given, else a 2% split of the training
    blend (:data:`~megatron_tst.data.checks.VALID_SPLIT`). Check the data first
    (``megatron_tst.data.build``): megatron trusts the files, and loops forever on an empty split.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    common = dict(
        random_seed=seed,
        sequence_length=sequence_length,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=cache_dir,
        mid_level_dataset_surplus=BLEND_SURPLUS,
    )
    train_blend = _blend(train_paths, train_weights, "data.train_paths")
    if valid_paths:
        config = GPTDatasetConfig(
            blend_per_split=[train_blend, _blend(valid_paths, None, "data.valid_paths"), None],
            **common)
    else:
        config = GPTDatasetConfig(blend=train_blend, split=VALID_SPLIT, **common)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train_samples, num_valid_samples, 0], lambda: True, config).build()
    return train, valid


class MicrobatchSampler:
    """Index lists of this rank's micro-batches, step after step, from ``consumed_samples``."""

    def __init__(self, layout: BatchLayout, consumed_samples: int, num_steps: Optional[int] = None):
        self.layout, self.consumed_samples, self.num_steps = layout, consumed_samples, num_steps

    def __iter__(self) -> Iterator[list[int]]:
        consumed, step = self.consumed_samples, 0
        while self.num_steps is None or step < self.num_steps:
            yield from self.layout.microbatch_indices(consumed)
            consumed += self.layout.global_batch_size
            step += 1


class TokenIdCheck(torch.utils.data.Dataset):
    """A dataset whose every sample is checked to hold token ids in ``[0, vocab_size)``.

    The start-up checks read a bounded sample of each file; this one sees every token the run
    reads, for the price of a min and a max per sample, and turns a bad id (part of the data made
    with another tokenizer) into a ``DataError`` that names the dataset, instead of an index error
    in the embedding (a device-side assert on GPU) that names nothing.
    """

    def __init__(self, dataset, vocab_size: int, *, split: str, tokenizer_name: str):
        self.dataset, self.vocab_size = dataset, vocab_size
        self.split, self.tokenizer_name = split, tokenizer_name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # the wrapped dataset's attributes (not while unpickling)
        if name in ("dataset", "__setstate__") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        tokens, labels = torch.as_tensor(sample["tokens"]), torch.as_tensor(sample["labels"])
        lo = min(int(tokens.min()), int(labels.min()))
        hi = max(int(tokens.max()), int(labels.max()))
        if lo < 0 or hi >= self.vocab_size:
            raise DataError(
                f"token id {hi if hi >= self.vocab_size else lo:,} in {self.split} sample "
                f"{index:,} (from {self._source_of(sample)}) is outside the vocabulary of "
                f"{self.tokenizer_name} ({self.vocab_size:,} entries): part of the data was made "
                f"with another tokenizer; re-run `megatron-tst preprocess` on that text with this "
                f"tokenizer, or set data.tokenizer.path to the tokenizer the data was made with")
        return sample

    def _source_of(self, sample: dict) -> str:
        dataset = self.dataset
        if "dataset_id" in sample and hasattr(dataset, "datasets"):  # a BlendedDataset
            dataset = dataset.datasets[int(sample["dataset_id"])]
        return str(getattr(dataset, "dataset_path", None) or "the data")


def _worker_message(err: Exception) -> str:
    """The original message of an error re-raised from a DataLoader worker (torch wraps it in
    ``Caught X in DataLoader worker process N. Original Traceback ...``)."""
    text = getattr(err, "message", None) or str(err)
    if "Original Traceback" not in text:
        return text
    return text.rstrip().rsplit(f"{type(err).__name__}: ", 1)[-1]


def _unwrap_worker_errors(batches: Iterator[dict]) -> Iterator[dict]:
    try:
        yield from batches
    except DataError as err:
        raise DataError(_worker_message(err)) from None


def iterate_microbatches(dataset, layout: BatchLayout, consumed_samples: int,
                         num_steps: Optional[int] = None, num_workers: int = 0) -> Iterator[dict]:
    """Micro-batches (dicts of stacked tensors) for consecutive steps from ``consumed_samples``."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=MicrobatchSampler(layout, consumed_samples, num_steps),
        num_workers=num_workers, collate_fn=collate, persistent_workers=False,
        prefetch_factor=4 if num_workers else None)
    return _unwrap_worker_errors(iter(loader)) if num_workers else iter(loader)


def collate(samples: list[dict]) -> dict:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
            for key in samples[0] if samples[0][key] is not None}
