from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_tst.data.preprocess import DataError, PreprocessResult, preprocess, preprocess_documents


def write_jsonl(path: Path, texts, key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, key: text}) + "\n")
    return path


def write_txt(path: Path, texts) -> Path:
    # documents separated by one or more blank (or whitespace-only) lines
    separators = ["\n\n", "\n\n\n", "\n  \n"]
    body = "".join(t + separators[i % 3] for i, t in enumerate(texts))
    path.write_text(body, encoding="utf-8")
    return path


def read_back(prefix: Path, tokenizer) -> list[str]:
    dataset = IndexedDataset(str(prefix))
    docs = []
    for i in range(len(dataset)):
        seq = dataset[i]
        assert seq[-1] == tokenizer.eod, "every document ends with EOD"
        assert tokenizer.eod not in seq[:-1]
        docs.append(tokenizer.detokenize(seq[:-1].tolist()))
    return docs


def check_counts(result: PreprocessResult, texts, tokenizer):
    dataset = IndexedDataset(str(result.prefix))
    assert len(dataset) == result.num_documents == len(texts)
    numpy.testing.assert_array_equal(dataset.document_indices, numpy.arange(len(texts) + 1))
    expected_tokens = sum(len(tokenizer.tokenize(t)) + 1 for t in texts)
    assert result.num_tokens == expected_tokens == int(dataset.sequence_lengths.sum())
    assert result.bin_path.stat().st_size == expected_tokens * dataset.index.dtype_size


# --- round trips ---------------------------------------------------------------------------------
def test_jsonl_round_trip(tmp_path, texts, sp_tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", texts)
    result = preprocess([path], tmp_path / "out" / "corpus", sp_tokenizer)
    assert result.prefix == tmp_path / "out" / "corpus"
    assert result.bin_path.is_file() and result.idx_path.is_file()
    assert IndexedDataset(str(result.prefix)).index.dtype == numpy.uint16
    assert read_back(result.prefix, sp_tokenizer) == texts
    check_counts(result, texts, sp_tokenizer)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["corpus.bin", "corpus.idx"]


def test_txt_round_trip_keeps_inner_newlines(tmp_path, texts, hf_tokenizer):
    assert any("\n" in t for t in texts)
    path = write_txt(tmp_path / "docs.txt", texts)
    result = preprocess([path], tmp_path / "txt", hf_tokenizer)
    assert read_back(result.prefix, hf_tokenizer) == texts
    check_counts(result, texts, hf_tokenizer)


def test_compressed_and_multiple_inputs_in_order(tmp_path, texts, sp_tokenizer):
    a = tmp_path / "a.jsonl.gz"
    with gzip.open(a, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"body": t}) + "\n\n" for t in texts[:30]))  # blank lines ok
    b = tmp_path / "b.txt.bz2"
    b.write_bytes(bz2.compress("\n\n".join(texts[30:50]).encode()))
    c = write_txt(tmp_path / "c.txt", texts[50:60])
    result = preprocess([a, b, c], tmp_path / "multi", sp_tokenizer, text_key="body")
    assert read_back(result.prefix, sp_tokenizer) == texts[:60]


def test_empty_texts_are_skipped(tmp_path, texts, sp_tokenizer):
    path = write_jsonl(tmp_path / "docs.jsonl", [texts[0], "", "   ", texts[1]])
    result = preprocess([path], tmp_path / "skip", sp_tokenizer)
    assert (result.num_documents, result.num_skipped) == (2, 2)
    assert read_back(result.prefix, sp_tokenizer) == texts[:2]


def test_utf8_bom_is_ignored(tmp_path, sp_tokenizer):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffHello world.\n\nSecond doc.".encode("utf-8"))
    result = preprocess([path], tmp_path / "bom", sp_tokenizer)
    assert read_back(result.prefix, sp_tokenizer) == ["Hello world.", "Second doc."]


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
def test_workers_give_identical_output(tmp_path, texts, sp_model, hf_json, sp_tokenizer, hf_tokenizer, kind):
    many = texts * 3  # 360 documents: several 64-document batches per worker
    path = write_jsonl(tmp_path / "docs.jsonl", many)
    tokenizer = sp_tokenizer if kind == "sentencepiece" else hf_tokenizer
    one = preprocess([path], tmp_path / "w1", tokenizer, workers=1)
    # workers reload the tokenizer from a (kind, path) spec
    spec = (kind, sp_model if kind == "sentencepiece" else hf_json)
    two = preprocess([path], tmp_path / "w2", spec, workers=2)
    assert (one.num_documents, one.num_tokens) == (two.num_documents, two.num_tokens) == (
        len(many), one.num_tokens
    )
    assert one.bin_path.read_bytes() == two.bin_path.read_bytes()
    assert one.idx_path.read_bytes() == two.idx_path.read_bytes()


def test_workers_with_plain_object_tokenizer(tmp_path, texts, sp_tokenizer):
    """A tokenizer without a reload spec is pickled to the workers."""

    class Wrapped:
        def __init__(self, inner):
            self.inner = inner
            self.eod = inner.eod
            self.vocab_size = inner.vocab_size

        def tokenize(self, text):
            return self.inner.tokenize(text)

    path = write_jsonl(tmp_path / "docs.jsonl", texts)
    one = preprocess([path], tmp_path / "o1", sp_tokenizer)
    two = preprocess([path], tmp_path / "o2", Wrapped(sp_tokenizer), workers=2)
    assert one.bin_path.read_bytes() == two.bin_path.read_bytes()


def test_preprocess_documents_in_memory(tmp_path, texts, sp_tokenizer):
    result = preprocess_documents(iter(texts[:10] + [" \n"]), tmp_path / "mem", sp_tokenizer)
    assert (result.num_documents, result.num_skipped) == (10, 1)
    assert read_back(result.prefix, sp_tokenizer) == texts[:10]
    check_counts(result, texts[:10], sp_tokenizer)
    with pytest.raises(DataError, match="no documents"):
        preprocess_documents(["", "  "], tmp_path / "none", sp_tokenizer)
    assert not list(tmp_path.glob("none*")) and not list(tmp_path.glob(".none*"))


def test_output_is_a_usable_gpt_dataset(tmp_path, texts, sp_tokenizer):
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    result = preprocess([write_jsonl(tmp_path / "d.jsonl", texts)], tmp_path / "gpt", sp_tokenizer)
    indexed = IndexedDataset(str(result.prefix))
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=32,
        tokenizer=sp_tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
        mid_level_dataset_surplus=0.005,
    )
    dataset = GPTDataset(
        indexed, str(result.prefix), numpy.arange(len(indexed), dtype=numpy.int32), None,
        Split.train, config,
    )
    sample = dataset[0]
    assert sample["tokens"].shape == (32,) and sample["labels"].shape == (32,)
    assert len(dataset) == (result.num_tokens - 1) // 32


# --- errors --------------------------------------------------------------------------------------
def test_missing_input(tmp_path, sp_tokenizer):
    existing = write_jsonl(tmp_path / "ok.jsonl", ["text"])
    with pytest.raises(DataError, match=r"missing\.jsonl: input file not found"):
        preprocess([existing, tmp_path / "missing.jsonl"], tmp_path / "out", sp_tokenizer)
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("empty.txt", b"", r"empty\.txt: no documents found"),
        ("blank.txt", b"\n   \n\n", r"blank\.txt: no documents found"),
        ("empty.jsonl", b"\n\n", r"empty\.jsonl: no documents found"),
        ("allempty.jsonl", b'{"text": ""}\n', r"allempty\.jsonl: no documents found .*empty"),
        ("latin1.txt", "ok line\n\ncaf\u00e9 au lait\n".encode("latin-1"),
         r"latin1\.txt:3: not valid UTF-8 .*iconv"),
        ("latin1.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
         r"latin1\.jsonl:2: not valid UTF-8"),
        ("badjson.jsonl", b'{"text": "fine"}\n\n{"text": "broken"\n',
         r"badjson\.jsonl:3: invalid JSON"),
        ("nokey.jsonl", b'{"text": "fine"}\n{"content": "x"}\n',
         r"nokey\.jsonl:2: no 'text' key .*'content'.*--text-key"),
        ("notobject.jsonl", b'["text"]\n', r"notobject\.jsonl:1: expected a JSON object"),
        ("notstring.jsonl", b'{"text": 3}\n', r"notstring\.jsonl:1: the 'text' value must be a string"),
        ("table.csv", b"a,b\n", r"table\.csv: unsupported input format"),
        ("corrupt.txt.gz", b"this is not gzip", r"corrupt\.txt\.gz: cannot read compressed data"),
    ],
)
def test_bad_inputs_raise_data_error(tmp_path, sp_tokenizer, name, content, pattern):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=pattern) as info:
        preprocess([path], tmp_path / "out", sp_tokenizer)
    assert isinstance(info.value, ValueError)
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_bad_input_in_a_worker_run(tmp_path, texts, sp_tokenizer):
    path = tmp_path / "late.jsonl"
    write_jsonl(path, texts * 3)
    with open(path, "a") as f:
        f.write("{not json}\n")
    with pytest.raises(DataError, match=rf"late\.jsonl:{len(texts) * 3 + 1}: invalid JSON"):
        preprocess([path], tmp_path / "out", sp_tokenizer, workers=2)
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_directory_input(tmp_path, texts, sp_tokenizer):
    """A directory is read recursively in name order, whatever its own name looks like."""
    directory = tmp_path / "dir.jsonl"
    (directory / "sub").mkdir(parents=True)
    write_jsonl(directory / "b.jsonl", texts[10:20])
    write_txt(directory / "sub" / "c.txt", texts[20:25])
    write_jsonl(directory / "a.jsonl", texts[:10])
    (directory / "notes.md").write_text("not an input")
    result = preprocess([directory], tmp_path / "out", sp_tokenizer)
    assert read_back(result.prefix, sp_tokenizer) == texts[:25]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no input files found"):
        preprocess([tmp_path / "empty"], tmp_path / "out2", sp_tokenizer)


def test_glob_input(tmp_path, texts, sp_tokenizer):
    write_jsonl(tmp_path / "p1.jsonl", texts[:5])
    write_jsonl(tmp_path / "p0.jsonl", texts[5:9])
    result = preprocess([str(tmp_path / "p*.jsonl")], tmp_path / "out", sp_tokenizer)
    assert read_back(result.prefix, sp_tokenizer) == texts[5:9] + texts[:5]
