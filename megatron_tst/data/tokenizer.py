"""Tokenizers for pre-training data: sentencepiece models and Hugging Face ``tokenizer.json`` files.

Both classes subclass megatron-core's ``MegatronLegacyTokenizer`` so that they can be handed directly
to megatron-core's dataset stack (``GPTDatasetConfig(tokenizer=...)``), which reads ``eod``, ``pad``,
``vocab_size`` and ``unique_identifiers``.

Conventions shared by both classes:

* ``tokenize(text)`` returns plain token ids and adds **no** special tokens (no BOS, no EOS); the
  preprocessing step appends ``eod`` after every document itself.
* ``eod`` is the end-of-document id (the model's EOS token).
* ``pad`` is the padding id, or ``-1`` when the tokenizer has no padding token. ``-1`` is exactly
  the "no pad token" value megatron-core's datasets use (``_PAD_TOKEN_ID``), so it is safe to pass on.
* ``bos`` is the beginning-of-sequence id, or ``-1`` when there is none.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

__all__ = [
    "HF_EOD_CANDIDATES",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "TokenizerSpec",
    "load_tokenizer",
    "train_sentencepiece",
]

#: Token names tried, in order, for the end-of-document id of a Hugging Face tokenizer.
HF_EOD_CANDIDATES: tuple[str, ...] = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
_HF_PAD_CANDIDATES: tuple[str, ...] = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
_HF_BOS_CANDIDATES: tuple[str, ...] = ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>")

TOKENIZER_KINDS: tuple[str, ...] = ("sentencepiece", "huggingface")


class TokenizerSpec(NamedTuple):
    """Everything needed to load a tokenizer again (e.g. in a worker process)."""

    kind: str
    path: str
    options: dict[str, Any]

    def load(self) -> "SentencePieceTokenizer | HFTokenizer":
        return load_tokenizer(self.kind, self.path, **self.options)


@contextmanager
def _quiet_legacy_warning() -> Iterator[None]:
    """megatron-core logs a deprecation warning for every legacy tokenizer built; silence it."""
    logger = logging.getLogger("megatron.core.datasets.megatron_tokenizer")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# sentencepiece
# --------------------------------------------------------------------------------------------------
class _SpecialIds(MegatronLegacyTokenizer):
    """The id properties megatron reads, shared by both tokenizers (set ``_vocab_size``,
    ``_eod``, ``_pad``, ``_bos`` and provide ``vocab``)."""

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
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"sentencepiece model not found: {str(path)!r}. Pass the path of an existing "
                "'.model' file (or train one: `megatron-tst preprocess --train-tokenizer ...`)."
            )
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(
                f"{str(path)!r} is not a valid sentencepiece model ({err}). Pass a '.model' file "
                "written by sentencepiece (for a Hugging Face tokenizer.json use kind 'huggingface')."
            ) from err
        eos = processor.eos_id()
        if eos < 0:
            raise ValueError(
                f"sentencepiece model {str(path)!r} defines no end-of-sentence token (eos_id=-1), "
                "so there is no end-of-document id. Retrain it with an eos piece (the default)."
            )
        self.path = path.resolve()
        self._processor = processor
        self._vocab_size = int(processor.GetPieceSize())
        self._eod = int(eos)
        self._pad = int(processor.pad_id())
        self._bos = int(processor.bos_id())
        self._unk = int(processor.unk_id())
        self._vocab: dict[str, int] | None = None
        with _quiet_legacy_warning():
            super().__init__(str(self.path), sha256=_file_sha256(path))

    # -- MegatronLegacyTokenizer interface ---------------------------------------------------------
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
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"Hugging Face tokenizer file not found: {str(path)!r}. Pass the path of a "
                "'tokenizer.json' (or of a directory containing one)."
            )
        try:
            import tokenizers
        except ImportError as err:  # pragma: no cover - tokenizers is a declared dependency
            raise ImportError(
                "Loading a Hugging Face tokenizer needs the 'tokenizers' package: pip install tokenizers"
            ) from err
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a plain Exception on malformed files
            raise ValueError(
                f"{str(path)!r} is not a valid Hugging Face tokenizer.json ({err}). Pass the "
                "tokenizer.json saved by `tokenizer.save(...)` / `save_pretrained(...)`."
            ) from err

        self.path = path.resolve()
        self._tokenizer = tokenizer
        self._vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

        if eod_token is not None:
            eod = tokenizer.token_to_id(eod_token)
            if eod is None:
                raise ValueError(
                    f"eod_token {eod_token!r} is not in the vocabulary of {str(path)!r}. Pass a "
                    f"token that exists (special tokens: {self._special_tokens()})."
                )
        else:
            eod = self._first_id(HF_EOD_CANDIDATES)
            if eod is None:
                raise ValueError(
                    f"cannot find an end-of-document token in {str(path)!r}: none of "
                    f"{list(HF_EOD_CANDIDATES)} is in its vocabulary (special tokens: "
                    f"{self._special_tokens()}). Pass it explicitly, e.g. "
                    "load_tokenizer('huggingface', path, eod_token='<|im_end|>') or --eod-token."
                )
        self.eod_token = eod_token if eod_token is not None else tokenizer.id_to_token(eod)
        self._eod = int(eod)
        pad = self._first_id(_HF_PAD_CANDIDATES)
        self._pad = -1 if pad is None or pad == self._eod else int(pad)
        bos = self._first_id(_HF_BOS_CANDIDATES)
        self._bos = -1 if bos is None else int(bos)
        self._vocab: dict[str, int] | None = None
        options: dict[str, Any] = {"sha256": _file_sha256(path)}
        if eod_token is not None:
            options["eod_token"] = eod_token
        with _quiet_legacy_warning():
            super().__init__(str(self.path), **options)

    def _first_id(self, names: Sequence[str]) -> int | None:
        for name in names:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def _special_tokens(self) -> list[str]:
        try:
            decoder = self._tokenizer.get_added_tokens_decoder()
            return [tok.content for _, tok in sorted(decoder.items()) if tok.special][:20]
        except AttributeError:  # pragma: no cover - very old tokenizers
            return []

    # -- MegatronLegacyTokenizer interface ---------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize many texts at once (faster than one call per text)."""
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

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
    aliases = {"sentencepiece": "sentencepiece", "spm": "sentencepiece", "sp": "sentencepiece",
               "huggingface": "huggingface", "hf": "huggingface"}
    canonical = aliases.get(str(kind).lower())
    if canonical is None:
        raise ValueError(
            f"unknown tokenizer kind {kind!r} for {str(path)!r}: use one of {list(TOKENIZER_KINDS)}"
        )
    if canonical == "sentencepiece":
        if kw:
            raise ValueError(f"sentencepiece tokenizers take no options, got {sorted(kw)}")
        return SentencePieceTokenizer(path)
    return HFTokenizer(path, **kw)


def tokenizer_spec_of(tokenizer: Any) -> TokenizerSpec | None:
    """The reload spec of a tokenizer object, or None for tokenizers not loaded from a file."""
    spec = getattr(tokenizer, "spec", None)
    return spec if isinstance(spec, TokenizerSpec) else None
