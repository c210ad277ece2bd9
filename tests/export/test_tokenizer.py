"""The exported tokenizer files encode exactly as the run's tokenizer (AutoTokenizer vs the
sentencepiece model or the tokenizer.json the data was made with), adding no special tokens."""

from __future__ import annotations

import json

import pytest

from megatron_tst.export.source import TokenizerLocation
from megatron_tst.export.tokenizer import CHECK_TEXTS, check_tokenizer, write_tokenizer
from megatron_tst.data.tokenizer import train_sentencepiece

transformers = pytest.importorskip("transformers")

CORPUS = """\
Token-superposition training averages the embeddings of s consecutive tokens into one position.
The first phase trains on bags of tokens; the second phase is plain next-token training.
Run the demo with `megatron-tst demo` and export it:   megatron-tst export runs/demo-cpu/checkpoints
    --to hf runs/demo-cpu/hf --check        # config.json, model.safetensors, tokenizer.json
A 3B model at 2,048 positions x 1,024 sequences sees 2,097,152 tokens per step (about 2.1M).
Learning rates of 3e-3, 2e-3, 5e-4 and 1e-3; betas (0.9, 0.95); weight decay 0.1; clipping 1.0.
Die Straße führt über den Fluss; l'été dernier, nous avons mangé des crêpes à Paris.
Numbers like 1000, 2000, 30000 and 400000 appear in tables: | 270m | 254.0M | 20k (6k) | 6 |.
JSON lines look like {"text": "Hello, world!", "id": 42} and YAML like model: {hidden_size: 128}.
Tabs\tseparate\tcolumns, and   runs of spaces   stay as they are in the raw text.
The quick brown fox jumps over the lazy dog while the cat sat on a mat near the river bank.
Parallelism: tensor (TP), pipeline (PP), expert (EP) and data (DP) parallel, with gloo on CPU.
Checkpoints are megatron dist checkpoints; they reshard across layouts when loaded.
"""
TEXTS = [line for line in CORPUS.splitlines() if line.strip()] * 3


@pytest.mark.parametrize("kind", ["megatron-tst-bpe", "unigram-nfkc", "bpe-defaults"])
def test_sentencepiece_models_encode_identically(kind, tmp_path):
    import sentencepiece as spm

    if kind == "megatron-tst-bpe":  # what the demo and `preprocess --train-tokenizer` train
        model = train_sentencepiece(TEXTS, tmp_path / "sp", 400)
    else:  # sentencepiece's own defaults: nmt_nfkc, whitespace collapsing, no byte fallback
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(TEXTS), model_prefix=str(tmp_path / "sp"),
            vocab_size=200 if kind.startswith("unigram") else 300,
            model_type="unigram" if kind.startswith("unigram") else "bpe", minloglevel=2)
        model = tmp_path / "sp.model"
    location = TokenizerLocation("sentencepiece", model)
    out = tmp_path / "hf"
    out.mkdir()
    ids = write_tokenizer(location, out, model_max_length=128)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(model))
    differ = check_tokenizer(out, location, (*CHECK_TEXTS, *TEXTS))
    if kind.startswith("unigram"):
        # Unigram segmentations of equal score (the same pieces in another order, e.g. "0"+"00"
        # against "00"+"0") may be broken differently by sentencepiece and tokenizers' Viterbi.
        for text in differ:
            assert sorted(tok.encode(text, add_special_tokens=False)) == sorted(sp.encode(text))
    else:
        assert differ == []
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
    assert check_tokenizer(out, location, (*CHECK_TEXTS, *TEXTS)) == []
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf("hello world")["input_ids"] == tok.encode("hello world",
                                                         add_special_tokens=False).ids
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is False
