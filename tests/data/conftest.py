"""Shared fixtures for the data tests: small synthetic corpora and tokenizers built in-test."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

_WORDS = (
    "the a of and to in is was for on that with as by at from his her it an were are which this "
    "be or has had first one their its new after who they two her she been other when there all "
    "during into school time may years more most only over city some world would where later up "
    "such used many can state about national out known university united then made river war "
    "music film game team season album series year people between including under history became"
).split()


def make_texts(count: int, seed: int = 0) -> list[str]:
    """Deterministic English-like documents of 1-4 paragraphs, with punctuation, digits and
    a few non-ASCII characters, so round trips exercise more than plain words."""
    rng = random.Random(seed)
    extras = ["café", "naïve", "Zürich", "1998", "3.14", "(see below)", "—", "\"quoted\"", "x2"]
    docs = []
    for _ in range(count):
        paragraphs = []
        for _ in range(rng.randint(1, 4)):
            sentences = []
            for _ in range(rng.randint(1, 5)):
                words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
                if rng.random() < 0.3:
                    words.insert(rng.randrange(len(words)), rng.choice(extras))
                sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?"]))
            paragraphs.append(" ".join(sentences))
        docs.append("\n".join(paragraphs))
    return docs


@pytest.fixture(scope="session")
def texts() -> list[str]:
    return make_texts(120)


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, texts) -> Path:
    from megatron_tst.data.tokenizer import train_sentencepiece

    prefix = tmp_path_factory.mktemp("sp") / "tiny"
    return train_sentencepiece(texts, prefix, vocab_size=400, seed=7)


@pytest.fixture(scope="session")
def sp_tokenizer(sp_model):
    from megatron_tst.data.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(sp_model)


def build_hf_tokenizer_json(path: Path, texts: list[str], special_tokens: list[str]) -> Path:
    """A tiny byte-level BPE tokenizer trained with the `tokenizers` library, saved as JSON."""
    pytest.importorskip("tokenizers")  # the project's `hf` extra
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def hf_json(tmp_path_factory, texts) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    return build_hf_tokenizer_json(path, texts, ["<|endoftext|>", "<pad>"])


@pytest.fixture(scope="session")
def hf_tokenizer(hf_json):
    from megatron_tst.data.tokenizer import HFTokenizer

    return HFTokenizer(hf_json)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a test that takes more than ~30 s")
