from __future__ import annotations

import json
import time

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

pytest.importorskip("gensim")  # the demo corpus is read from the gensim package

from megatron_tst.data.corpus import demo_documents, split_documents
from megatron_tst.data.demo import DemoData, prepare_demo_data


def _check_prepared(data: DemoData, vocab_size: int):
    tokenizer = data.load_tokenizer()
    assert tokenizer.vocab_size == data.vocab_size == vocab_size
    for prefix, tokens, documents in (
        (data.train_prefix, data.num_train_tokens, data.num_train_documents),
        (data.valid_prefix, data.num_valid_tokens, data.num_valid_documents),
    ):
        dataset = IndexedDataset(str(prefix))
        assert len(dataset) == documents > 0
        assert int(dataset.sequence_lengths.sum()) == tokens
        assert dataset.index.dtype == numpy.uint16
        last = dataset[len(dataset) - 1]
        assert last[-1] == tokenizer.eod
        assert numpy.count_nonzero(dataset[0] == tokenizer.eod) == 1
    return tokenizer


def test_prepare_demo_subset_and_cache(tmp_path):
    cache = tmp_path / "demo"
    data = prepare_demo_data(cache, vocab_size=512, max_documents=40)
    assert data.num_train_documents + data.num_valid_documents == 40
    assert data.num_valid_documents == 2  # ceil(5 % of 40)
    tokenizer = _check_prepared(data, 512)
    assert data.tokenizer_path == (cache / "tokenizer.model").resolve()
    assert data.train_prefix == (cache / "train").resolve()

    # valid documents read back as text from the corpus
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["arguments"]["max_documents"] == 40
    valid_docs = {f"{d.source}/{d.title}": d.text for d in demo_documents()}
    valid_dataset = IndexedDataset(str(data.valid_prefix))  # keep it alive: arrays view its mmap
    first_valid = valid_dataset[0]
    assert tokenizer.detokenize(first_valid[:-1].tolist()) == valid_docs[manifest["valid_titles"][0]]

    # second call: served from the cache, same result, nothing rewritten
    mtime = data.train_prefix.with_suffix(".bin").stat().st_mtime_ns
    start = time.perf_counter()
    again = prepare_demo_data(cache, vocab_size=512, max_documents=40)
    assert time.perf_counter() - start < 3  # a fingerprint check, no parsing
    assert again == data
    assert data.train_prefix.with_suffix(".bin").stat().st_mtime_ns == mtime

    # an interrupted preparation (manifest never written) is redone, not half-used
    (cache / "manifest.json").unlink()
    data.train_prefix.with_suffix(".idx").write_bytes(b"truncated")
    redone = prepare_demo_data(cache, vocab_size=512, max_documents=40)
    assert redone == data
    _check_prepared(redone, 512)

    # a damaged manifest (valid JSON of another shape, or not text) is redone, not a traceback
    for damage in (b"[1, 2]", b'{"arguments": 1}', b"\xff\xfe"):
        (cache / "manifest.json").write_bytes(damage)
        assert prepare_demo_data(cache, vocab_size=512, max_documents=40) == data

    # different arguments prepare again, aside: until complete the cache is the previous one
    other = prepare_demo_data(cache, vocab_size=600, max_documents=40)
    assert other.vocab_size == 600 and other.num_train_tokens != data.num_train_tokens
    assert json.loads((cache / "manifest.json").read_text())["arguments"]["vocab_size"] == 600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [
        f".{cache.name}.lock"]  # no staging or old copy left behind


def test_prepare_demo_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="valid_fraction"):
        prepare_demo_data(tmp_path, valid_fraction=0.0)
    with pytest.raises(ValueError, match="max_documents"):
        prepare_demo_data(tmp_path, max_documents=1)


def test_prepare_demo_full(tmp_path):
    """The real demo preparation at vocab 4096 (a few seconds)."""
    start = time.perf_counter()
    data = prepare_demo_data(tmp_path / "full")
    elapsed = time.perf_counter() - start
    assert elapsed < 60
    _check_prepared(data, 4096)
    docs = demo_documents()
    train, valid = split_documents(docs, 0.05, 1234)
    assert (data.num_train_documents, data.num_valid_documents) == (len(train), len(valid))
    assert data.num_train_tokens > 500_000 and data.num_valid_tokens > 10_000
    start = time.perf_counter()
    assert prepare_demo_data(tmp_path / "full") == data
    assert time.perf_counter() - start < 3  # a fingerprint check, no parsing
