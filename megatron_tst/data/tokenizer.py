"""Tokenizers for pre-training data: sentencepiece models and Hugging Face ``tokenizer.json`` files.

Both classes subclass megatron-core's ``MegatronTokenizerBase`` (``megatron.core.tokenizers``, the
same class in every supported megatron-core line; the legacy ``MegatronLegacyTokenizer`` is gone from
0.19) so that they can be handed directly to megatron-core's dataset stack
(``GPTDatasetConfig(tokenizer=...)``), which reads ``eod``, ``pad``, ``vocab_size`` and
``unique_identifiers``.

Conventions shared by both classes:

* ``tokenize(text)`` returns plain token ids and adds **no** special tokens (no BOS, no EOS); the
  preprocessing step appends ``eod`` after every document itself.
* ``eod`` is the end-of-document id (the model's EOS token).
* ``pad`` is the padding id, or ``-1`` when the tokenizer has no padding token. ``-1`` is exactly
  the "no pad token" value megatron-core's datasets use (``_PAD_TOKEN_ID``), so it is safe to pass on.
* ``bos`` is the beginning-of-sequence id, or ``-1`` when there is none.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Sequence
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

from megatron.core.tokenizers import MegatronTokenizerBase

from megatron_tst.data.tokenizer_files import (HF_EOD_CANDIDATES, TOKENIZER_KINDS,
                                               canonical_kind, file_sha256, hf_first_id,
                                               hf_special_tokens, open_huggingface,
                                               open_sentencepiece)

__all__ = [
    "HF_EOD_CANDIDATES",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TokenizerSpec",
    "load_tokenizer",
    "train_sentencepiece",
]


class TokenizerSpec(NamedTuple):
    """Everything needed to load a tokenizer again (e.g. in a worker process)."""

    kind: str
    path: str
    options: dict[str, Any]

    def load(self) -> "SentencePieceTokenizer | HFTokenizer":
        return load_tokenizer(self.kind, self.path, **self.options)


# --------------------------------------------------------------------------------------------------
# sentencepiece
# --------------------------------------------------------------------------------------------------
class _SpecialIds(MegatronTokenizerBase):
    """The id properties megatron reads, shared by both tokenizers (set ``_vocab_size``,
    ``_eod``, ``_pad``, ``_bos`` and provide ``vocab``).

    ``unique_identifiers`` (class, file, its sha256, options) is what megatron's datasets hash into
    their cache descriptions: the same file gives the same identifiers wherever it is opened."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(str(path), config={})
        self.path = path
        self.unique_identifiers: OrderedDict[str, Any] = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [str(path)])]
        )
        self.unique_identifiers.update((k, str(v)) for k, v in options.items())

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} is a pre-training tokenizer and has no chat template"
        )

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: token for token, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def bos(self) -> int:
        return self._bos


class SentencePieceTokenizer(_SpecialIds):
    """A sentencepiece ``.model`` file. ``eod`` is the model's ``</s>`` (eos) id."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | Path) -> None:
        opened = open_sentencepiece(model_path)  # FileNotFoundError / ValueError with the fix
        super().__init__(opened.path, sha256=file_sha256(opened.path))
        self._processor = opened.backend
        self._vocab_size = opened.vocab_size
        self._eod, self._pad, self._bos, self._unk = opened.eod, opened.pad, opened.bos, opened.unk
        self._vocab: dict[str, int] | None = None

    # -- MegatronTokenizerBase interface -----------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._processor.EncodeAsIds(text)

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize many texts at once (faster than one call per text)."""
        return self._processor.EncodeAsIds(list(texts))

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._processor.DecodeIds([int(i) for i in ids])

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = {self._processor.IdToPiece(i): i for i in range(self._vocab_size)}
        return self._vocab

    @property
    def unk(self) -> int:
        return self._unk

    # -- project helpers ---------------------------------------------------------------------------
    @property
    def spec(self) -> TokenizerSpec:
        return TokenizerSpec(self.kind, str(self.path), {})

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _sentencepiece_lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Split documents into training sentences: one per non-blank line, long lines chunked."""
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if len(line.encode("utf-8")) <= max_bytes:
                yield line
                continue
            # Chunk an over-long line at spaces (sentencepiece silently skips longer sentences).
            chunk: list[str] = []
            size = 0
            for word in line.split(" "):
                word_size = len(word.encode("utf-8")) + 1
                if chunk and size + word_size > max_bytes:
                    yield " ".join(chunk)
                    chunk, size = [], 0
                if word_size > max_bytes:  # a single giant "word": cut by characters
                    word = word.encode("utf-8")[: max_bytes - 1].decode("utf-8", "ignore")
                    word_size = len(word.encode("utf-8")) + 1
                chunk.append(word)
                size += word_size
            if chunk:
                yield " ".join(chunk)


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int,
    *,
    seed: int = 1234,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
    max_sentences: int = 2_000_000,
    max_sentence_bytes: int = 8192,
    num_threads: int = 4,
) -> Path:
    """Train a sentencepiece model on ``texts`` and write ``<model_prefix>.model``; return that path.

    Training streams from an iterator (no temporary text file). Every non-blank line of every text
    is one training sentence; the first ``max_sentences`` are used, in order (no shuffling), so the
    result is deterministic for the same inputs. The model uses byte fallback (any text encodes),
    identity normalisation without whitespace collapsing (``detokenize(tokenize(t)) == t``; newlines
    and tabs become byte pieces), split digits, and ids ``unk=0, bos=1, eos=2 (the eod), pad=3``.
    ``model_type`` is ``"bpe"`` (default, fast to train) or ``"unigram"``. BPE results do not depend
    on ``num_threads``; unigram results do, so keep it fixed for reproducible unigram models.
    """
    import sentencepiece

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', not {model_type!r}")
    if vocab_size < 300:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the model holds 256 byte-fallback pieces and "
            "4 special tokens; use at least 300."
        )
    prefix = Path(model_prefix)
    model_path = prefix.with_name(prefix.name + ".model")
    model_path.parent.mkdir(parents=True, exist_ok=True)

    sentences = _sentencepiece_lines(texts, max_sentence_bytes)
    first = next(sentences, None)
    if first is None:
        raise ValueError("cannot train a sentencepiece tokenizer: the training texts are empty")

    def all_sentences() -> Iterator[str]:
        yield first
        yield from sentences

    sentencepiece.set_random_generator_seed(seed)
    buffer = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=all_sentences(),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=False,
            max_sentence_length=max_sentence_bytes,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(
            f"sentencepiece training failed for vocab_size={vocab_size}: {err}. If the vocabulary "
            "is too large for the training text, lower the vocab size or add more text."
        ) from err
    # Write atomically so an interrupted run never leaves a truncated model behind.
    tmp = model_path.with_name(f"{model_path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, model_path)
    return model_path


# --------------------------------------------------------------------------------------------------
# Hugging Face tokenizers
# --------------------------------------------------------------------------------------------------
class HFTokenizer(_SpecialIds):
    """A Hugging Face fast tokenizer loaded from ``tokenizer.json`` with the ``tokenizers`` package.

    ``path`` is the ``tokenizer.json`` file or a directory containing one. The end-of-document token
    is ``eod_token`` when given, else the first of :data:`HF_EOD_CANDIDATES` in the vocabulary.
    """

    kind = "huggingface"

    def __init__(self, path: str | Path, *, eod_token: str | None = None) -> None:
        opened = open_huggingface(path, eod_token=eod_token)  # errors name the path and the fix
        options: dict[str, Any] = {"sha256": file_sha256(opened.path)}
        if eod_token is not None:
            options["eod_token"] = eod_token
        super().__init__(opened.path, **options)
        self._tokenizer = opened.backend
        self._vocab_size = opened.vocab_size
        self.eod_token = opened.eod_token
        self._eod, self._pad, self._bos = opened.eod, opened.pad, opened.bos
        self._vocab: dict[str, int] | None = None

    def _first_id(self, names: Sequence[str]) -> int | None:
        return hf_first_id(self._tokenizer, names)

    def _special_tokens(self) -> list[str]:
        return hf_special_tokens(self._tokenizer)

    # -- MegatronTokenizerBase interface -----------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize many texts at once (faster than one call per text)."""
        # encode_batch_fast (tokenizers >= 0.20.2): the same ids without character offsets,
        # faster and with less memory per batch
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        return [encoding.ids for encoding in encode(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = dict(self._tokenizer.get_vocab(with_added_tokens=True))
        return self._vocab

    # -- project helpers ---------------------------------------------------------------------------
    @property
    def spec(self) -> TokenizerSpec:
        options = {"eod_token": self.eod_token}
        return TokenizerSpec(self.kind, str(self.path), options)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, eod={self.eod})"


# --------------------------------------------------------------------------------------------------
def load_tokenizer(kind: str, path: str | Path, **kw: Any) -> SentencePieceTokenizer | HFTokenizer:
    """Load a tokenizer: ``kind`` is ``"sentencepiece"`` (a ``.model``) or ``"huggingface"``
    (a ``tokenizer.json`` or its directory; accepts ``eod_token=``)."""
    canonical = canonical_kind(kind, path)
    if canonical == "sentencepiece":
        if kw:
            raise ValueError(f"sentencepiece tokenizers take no options, got {sorted(kw)}")
        return SentencePieceTokenizer(path)
    return HFTokenizer(path, **kw)


def tokenizer_spec_of(tokenizer: Any) -> TokenizerSpec | None:
    """The reload spec of a tokenizer object, or None for tokenizers not loaded from a file."""
    spec = getattr(tokenizer, "spec", None)
    return spec if isinstance(spec, TokenizerSpec) else None
