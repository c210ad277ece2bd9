"""The exported tokenizer files encode exactly as the run's tokenizer (AutoTokenizer vs the
sentencepiece model or the tokenizer.json the data was made with), adding no special tokens."""

from __future__ import annotations

import json

import pytest

from megatron_tst.export.source import TokenizerLocation
from megatron_tst.export.tokenizer import CHECK_TEXTS, check_tokenizer, write_tokenizer
from megatron_tst.data.tokenizer import train_sentencepiece
from tests.conftest import REPO

transformers = pytest.importorskip("transformers")

TEXTS = [line for path in ("README.md", "docs/method.md") for line in
         (REPO / path).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("kind", ["megatron-tst-bpe", "unigram-nfkc", "bpe-defaults"])
def test_sentencepiece_models_encode_identically(kind, tmp_path):
    import sentencepiece as spm

    if kind == "megatron-tst-bpe":  # what the demo and `preprocess --train-tokenizer` train
        model = train_sentencepiece(TEXTS, tmp_path / "sp", 600)
    else:  # sentencepiece's own defaults: nmt_nfkc, whitespace collapsing, no byte fallback
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(TEXTS), model_prefix=str(tmp_path / "sp"), vocab_size=400,
            model_type="unigram" if kind.startswith("unigram") else "bpe", minloglevel=2)
        model = tmp_path / "sp.model"
    location = TokenizerLocation("sentencepiece", model)
    out = tmp_path / "hf"
    out.mkdir()
    ids = write_tokenizer(location, out, model_max_length=128)
    assert check_tokenizer(out, location, (*CHECK_TEXTS, *TEXTS[:50])) == []
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert tok("the cat")["input_ids"] == sp.encode("the cat")  # no BOS
    assert tok.eos_token_id == ids.eos == sp.eos_id()
    assert tok.decode(sp.encode(TEXTS[3])) == sp.decode(sp.encode(TEXTS[3]))


def test_huggingface_tokenizer_is_copied_without_its_bos_template(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    tok.save(str(tmp_path / "tokenizer.json"))
    location = TokenizerLocation("huggingface", tmp_path / "tokenizer.json")
    out = tmp_path / "hf"
    out.mkdir()
    ids = write_tokenizer(location, out, model_max_length=64)
    assert (ids.bos, ids.eos_token) == (bos, "<|end_of_text|>")
    assert check_tokenizer(out, location, (*CHECK_TEXTS, *TEXTS[:50])) == []
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf("hello world")["input_ids"] == tok.encode("hello world",
                                                         add_special_tokens=False).ids
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
