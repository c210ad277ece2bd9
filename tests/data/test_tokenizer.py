from __future__ import annotations

import hashlib

import pytest
from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_tst.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerSpec,
    load_tokenizer,
    train_sentencepiece,
)
from tests.data.conftest import build_hf_tokenizer_json

TRICKY = "  Two  spaces,\ttab and\nnewline; unicode: café Zürich 😀 — 12345 \r\n end "


# --- sentencepiece -------------------------------------------------------------------------------
def test_sentencepiece_round_trip_and_special_ids(sp_tokenizer, texts):
    tok = sp_tokenizer
    assert isinstance(tok, MegatronTokenizerBase)
    assert tok.vocab_size == 400
    assert (tok.eod, tok.pad, tok.bos) == (2, 3, 1)
    assert tok.eos == tok.eod
    assert tok.inv_vocab[tok.eod] == "</s>" and tok.vocab["<pad>"] == tok.pad
    for text in texts[:20] + [TRICKY]:
        ids = tok.tokenize(text)
        assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eod not in ids  # no special tokens added
        assert tok.detokenize(ids) == text  # identity normalisation + byte fallback: exact
    assert tok.tokenize_batch(texts[:3]) == [tok.tokenize(t) for t in texts[:3]]


def test_sentencepiece_unique_identifiers(sp_tokenizer, sp_model):
    ids = sp_tokenizer.unique_identifiers
    assert ids["class"] == "SentencePieceTokenizer"
    assert ids["tokenizer_path"] == [str(sp_model.resolve())]
    assert ids["sha256"] == hashlib.sha256(sp_model.read_bytes()).hexdigest()
    assert sp_tokenizer.spec == TokenizerSpec("sentencepiece", str(sp_model.resolve()), {})


def test_train_sentencepiece_is_deterministic(tmp_path, texts):
    a = train_sentencepiece(texts, tmp_path / "a" / "m", vocab_size=350, seed=3)
    b = train_sentencepiece(iter(texts), tmp_path / "b" / "m", vocab_size=350, seed=3)
    assert a.name == "m.model" and a.is_file()
    assert a.read_bytes() == b.read_bytes()
    assert not list(tmp_path.glob("**/*.tmp*"))


def test_train_sentencepiece_errors(tmp_path, texts):
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece(texts, tmp_path / "m", vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        train_sentencepiece(["", "  \n "], tmp_path / "m", vocab_size=400)
    with pytest.raises(ValueError, match="vocab"):
        train_sentencepiece(["tiny text"], tmp_path / "m", vocab_size=5000)


# --- Hugging Face --------------------------------------------------------------------------------
def test_hf_round_trip_and_special_ids(hf_tokenizer, hf_json, texts):
    tok = hf_tokenizer
    assert isinstance(tok, MegatronTokenizerBase)
    assert tok.eod == 0 and tok.eod_token == "<|endoftext|>"
    assert tok.pad == 1
    assert tok.bos == -1
    assert tok.vocab_size == 400
    for text in texts[:20] + [TRICKY]:
        ids = tok.tokenize(text)
        assert tok.eod not in ids
        assert tok.detokenize(ids) == text  # byte-level BPE: exact
    assert tok.detokenize([tok.eod]) == "<|endoftext|>"
    assert tok.tokenize_batch(texts[:3]) == [tok.tokenize(t) for t in texts[:3]]
    # a directory holding tokenizer.json works too
    assert HFTokenizer(hf_json.parent).vocab_size == tok.vocab_size


@pytest.mark.parametrize("name", ["<|end_of_text|>", "</s>", "<eos>"])
def test_hf_eod_found_by_common_names(tmp_path, texts, name):
    path = build_hf_tokenizer_json(tmp_path / "tokenizer.json", texts[:30], ["<s>", name])
    tok = load_tokenizer("huggingface", path)
    assert tok.eod == 1 and tok.bos == 0 and tok.pad == -1


def test_hf_explicit_eod_and_missing_eod(tmp_path, texts):
    path = build_hf_tokenizer_json(tmp_path / "tokenizer.json", texts[:30], ["<|im_end|>"])
    with pytest.raises(ValueError, match=r"end-of-document token.*eod_token="):
        HFTokenizer(path)
    tok = load_tokenizer("hf", path, eod_token="<|im_end|>")
    assert tok.eod == 0
    assert tok.unique_identifiers["eod_token"] == "<|im_end|>"
    assert tok.spec.load().eod == 0
    with pytest.raises(ValueError, match="not in the vocabulary"):
        HFTokenizer(path, eod_token="<nope>")


# --- load_tokenizer errors -----------------------------------------------------------------------
def test_load_tokenizer_errors(tmp_path, sp_model, hf_json):
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bert'"):
        load_tokenizer("bert", sp_model)
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer("sentencepiece", missing)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer("huggingface", tmp_path)
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(ValueError, match="bad.model"):
        load_tokenizer("sentencepiece", bad)
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer("huggingface", sp_model)  # a sentencepiece model is not JSON
    with pytest.raises(ValueError, match="no options"):
        load_tokenizer("sentencepiece", sp_model, eod_token="</s>")
    assert isinstance(load_tokenizer("spm", sp_model), SentencePieceTokenizer)
    assert isinstance(load_tokenizer("huggingface", hf_json), HFTokenizer)
