"""The start-up data checks (``megatron_tst.data.checks``) against the real megatron-core format
and dataset builder: same constants, same split arithmetic, same sample counts, bounded work."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_tst.config.loader import load_config
from megatron_tst.data.build import check_run_data
from megatron_tst.data.checks import (DTYPE_CODES, INDEX_HEADER, DataSource, SampleShape,
                                      SplitPart, check_split, check_token_ids, read_index,
                                      samples_per_epoch, split_bounds)
from megatron_tst.data.errors import DataError
from megatron_tst.plan import RunPlan


def test_format_constants_are_megatrons():
    from megatron.core.datasets import indexed_dataset as m

    assert INDEX_HEADER == m._INDEX_HEADER
    assert {code: np.dtype(t) for code, t in DTYPE_CODES.items()} == {
        d.value: np.dtype(m.DType.dtype_from_code(d.value)) for d in m.DType}


def test_read_index_agrees_with_megatron(synthetic_data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    files = read_index(DataSource(synthetic_data["train"], "data.train_paths[0]"))
    ds = IndexedDataset(synthetic_data["train"])
    assert files.num_sequences == len(ds) == len(ds.sequence_lengths)
    assert files.num_documents == len(ds.document_indices) - 1
    assert files.num_tokens == int(ds.sequence_lengths.sum())
    assert files.tokens_in(10, 20) == int(ds.sequence_lengths[10:20].sum())
    assert files.tokens_in(5, 5) == 0
    assert np.array_equal(files.read_tokens(7, 10_000), ds[7])
    assert np.array_equal(files.read_tokens(7, 3), ds[7][:3])


@pytest.mark.parametrize("split", ["98,2,0", "99,1,0", "90,5,5", "1,1,0"])
def test_split_bounds_are_megatrons(split):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for n in (1, 2, 10, 24, 25, 26, 49, 50, 51, 99, 270, 1000, 12_345, 10**9 + 7):
        def nonempty(bounds):
            return [(a, b) if b > a else None for a, b in bounds]

        expected = nonempty((0, 0) if m is None else (int(round(m[0] * float(n))),
                                                      int(round(m[1] * float(n)))) for m in matrix)
        assert nonempty(split_bounds(n, split)) == expected, (split, n)


def test_predicted_sample_counts_are_what_megatron_builds(synthetic_data, tmp_path, megatron_env):
    """An unweighted blend is read once: the check's arithmetic (split bounds, tokens per part,
    samples per epoch) gives exactly the sizes megatron builds, for train and validation."""
    from megatron_tst.data.datasets import build_gpt_datasets
    from megatron_tst.data.tokenizer import load_tokenizer

    tok = load_tokenizer("sentencepiece", synthetic_data["tokenizer"])
    paths = [synthetic_data["train"], synthetic_data["valid"]]
    for seq in (16, 45):
        train, valid = build_gpt_datasets(
            train_paths=paths, train_weights=None, valid_paths=[], tokenizer=tok,
            sequence_length=seq, seed=1, num_train_samples=10**6, num_valid_samples=10**6,
            cache_dir=str(tmp_path / f"cache{seq}"))
        parts = [read_index(DataSource(p, "k")) for p in paths]
        bounds = [split_bounds(f.num_sequences) for f in parts]
        assert len(train) == sum(samples_per_epoch(f.tokens_in(*b[0]), seq)
                                 for f, b in zip(parts, bounds))
        assert len(valid) == sum(samples_per_epoch(f.tokens_in(*b[1]), seq)
                                 for f, b in zip(parts, bounds))


def _sparse_corpus(prefix: Path, num_sequences: int, length: int) -> None:
    """An index of ``num_sequences`` x ``length`` uint16 tokens written by megatron's own index
    writer, and a sparse .bin of the size it implies (no disk space used)."""
    from megatron.core.datasets.indexed_dataset import _IndexWriter

    with _IndexWriter(str(prefix) + ".idx", np.uint16) as writer:
        writer.write(np.full(num_sequences, length, dtype=np.int32), None,
                     np.arange(num_sequences + 1, dtype=np.int64))
    with open(str(prefix) + ".bin", "wb") as f:
        f.truncate(num_sequences * length * 2)


def test_a_200_gb_corpus_is_checked_in_bounded_time(tmp_path):
    """O(files), not O(tokens): 10^11 tokens (a 200 GB .bin) are checked by reading the .idx
    header, a few entries and a bounded token sample."""
    prefix = tmp_path / "huge"
    _sparse_corpus(prefix, 200_000, 500_000)
    tic = time.perf_counter()
    files = read_index(DataSource(str(prefix), "data.train_paths[0]"))
    check_token_ids(files, 32_000, "the tokenizer")
    shape = SampleShape(seq_length=4096, data_chunk=1, train_steps=20_000)
    check_split([SplitPart(files, 0, files.num_sequences, "the training data")], weights=None,
                num_samples=20_000 * 512, shape=shape, needs_all_samples=True, size_fix="")
    assert time.perf_counter() - tic < 5.0
    assert files.num_tokens == 10**11


def test_absurd_runs_are_refused_before_megatron_counts_epochs(tmp_path):
    prefix = tmp_path / "small"
    _sparse_corpus(prefix, 10, 100)
    files = read_index(DataSource(str(prefix), "data.train_paths[0]"))
    part = SplitPart(files, 0, 10, "the training data")
    shape = SampleShape(seq_length=32, data_chunk=1, train_steps=10**9)
    with pytest.raises(DataError, match="passes over its 1,000 tokens"):
        check_split([part], weights=None, num_samples=10**9, shape=shape,
                    needs_all_samples=True, size_fix="")
    check_split([part], weights=None, num_samples=10**6, shape=shape, needs_all_samples=True,
                size_fix="")  # 32,000 passes over a toy dataset is fine


def test_good_runs_pass_the_checks(tiny_recipe, synthetic_data, tmp_path):
    """No false alarms: plain, TST, weighted blends, the 2% split, DP and eval settings."""
    t, v = synthetic_data["train"], synthetic_data["valid"]
    for overrides in ([], ["tst.bag_size=4", "tst.ratio=0.3"],
                      [f"data.train_paths=[{t},{v}]", "data.train_weights=[3,1]",
                       "training.train_steps=1000"],
                      ["data.valid_paths=[]"], ["model.seq_length=64", "tst.bag_size=8",
                                                "tst.ratio=0.5", "training.train_steps=300"],
                      ["training.eval_interval=0", f"data.valid_paths=[{v},{v}]",
                       "training.eval_steps=1000"]):
        cfg = load_config(tiny_recipe, overrides)
        stream = RunPlan.build(cfg).stream
        check_run_data(cfg, stream)
        assert stream.chunk_tokens == cfg.model.seq_length * (
            cfg.tst.bag_size if cfg.tst.ratio else 1)


def test_errors_name_the_recipe_file_key_and_value(tiny_recipe, synthetic_data, tmp_path):
    prefix = tmp_path / "cut"
    for suffix in (".bin", ".idx"):
        shutil.copy(synthetic_data["train"] + suffix, str(prefix) + suffix)
    Path(str(prefix) + ".bin").write_bytes(b"\0" * 10)
    text = tiny_recipe.read_text().replace(synthetic_data["valid"], str(prefix))
    tiny_recipe.write_text(text)
    with pytest.raises(DataError) as err:
        cfg = load_config(tiny_recipe)
        check_run_data(cfg, RunPlan.build(cfg).stream)
    assert err.value.key == "data.valid_paths[0]" and err.value.source == str(tiny_recipe)
    assert str(err.value).startswith(f"{tiny_recipe}: data.valid_paths[0]='{prefix}': {prefix}.bin")


def test_every_sample_is_checked_also_in_worker_processes(synthetic_data, tmp_path,
                                                          megatron_env):
    """A bad id far from the start-up sample: the dataset wrapper raises a DataError naming the
    file, and one from a DataLoader worker reaches the caller as the same one-line message."""
    from megatron_tst.data.datasets import (BatchLayout, TokenIdCheck, build_gpt_datasets,
                                            iterate_microbatches)
    from megatron_tst.data.tokenizer import load_tokenizer

    prefix = tmp_path / "mid"
    for suffix in (".bin", ".idx"):
        shutil.copy(synthetic_data["train"] + suffix, str(prefix) + suffix)
    tokens = np.fromfile(str(prefix) + ".bin", dtype=np.uint16)
    tokens[:] = np.minimum(tokens, 90)
    tokens[len(tokens) // 3:] = 500
    tokens.tofile(str(prefix) + ".bin")
    tok = load_tokenizer("sentencepiece", synthetic_data["tokenizer"])
    train, _ = build_gpt_datasets(
        train_paths=[str(prefix)], train_weights=None, valid_paths=[synthetic_data["valid"]],
        tokenizer=tok, sequence_length=32, seed=1, num_train_samples=400, num_valid_samples=8,
        cache_dir=str(tmp_path / "cache"))
    checked = TokenIdCheck(train, tok.vocab_size, split="training", tokenizer_name="tok.model")
    assert len(checked) == len(train) and checked.dataset_path == str(prefix)
    messages = []
    for workers in (0, 1):
        with pytest.raises(DataError) as err:
            for _ in iterate_microbatches(checked, BatchLayout(400, 4, 0, 1), 0, num_steps=1,
                                          num_workers=workers):
                pass
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("token id 500 in training sample ")
    assert f"(from {prefix})" in messages[0] and "Traceback" not in messages[0]
