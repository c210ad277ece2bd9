"""Opening tokenizer files without megatron-core: the checks shared by the tokenizer classes.

``megatron_tst.data.tokenizer`` wraps what :func:`open_tokenizer` returns in classes derived from
megatron-core's ``MegatronTokenizerBase``; importing megatron-core takes seconds, so the start-up
checks of a run (``megatron_tst.data.build.check_run_data``) use this module directly. Both raise
the same errors: ``FileNotFoundError`` naming the path, ``ValueError`` for a file of the wrong
kind, a model without an end-of-document token or an unknown kind, ``ImportError`` when the
``tokenizers`` package is missing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

#: Token names tried, in order, for the end-of-document id of a Hugging Face tokenizer.
HF_EOD_CANDIDATES: tuple[str, ...] = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
HF_PAD_CANDIDATES: tuple[str, ...] = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
HF_BOS_CANDIDATES: tuple[str, ...] = ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>")

TOKENIZER_KINDS: tuple[str, ...] = ("sentencepiece", "huggingface")
_ALIASES = {"sentencepiece": "sentencepiece", "spm": "sentencepiece", "sp": "sentencepiece",
            "huggingface": "huggingface", "hf": "huggingface"}


@dataclass
class TokenizerFile:
    """A loaded tokenizer file: the backend object and the ids megatron needs."""

    kind: str
    path: Path  # the file itself (resolved); for HF the tokenizer.json, also when given its dir
    backend: Any  # sentencepiece.SentencePieceProcessor or tokenizers.Tokenizer
    vocab_size: int
    eod: int
    pad: int  # -1: none
    bos: int  # -1: none
    unk: int = -1
    eod_token: Optional[str] = None  # HF: the name of the eod token


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (a tokenizer's identity)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_kind(kind: str, path: Any = "") -> str:
    canonical = _ALIASES.get(str(kind).lower())
    if canonical is None:
        raise ValueError(
            f"unknown tokenizer kind {kind!r} for {str(path)!r}: use one of {list(TOKENIZER_KINDS)}"
        )
    return canonical


def open_sentencepiece(model_path: str | Path) -> TokenizerFile:
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
    return TokenizerFile("sentencepiece", path.resolve(), processor,
                         int(processor.GetPieceSize()), int(eos), int(processor.pad_id()),
                         int(processor.bos_id()), unk=int(processor.unk_id()))


def hf_first_id(tokenizer: Any, names: Sequence[str]) -> Optional[int]:
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def hf_special_tokens(tokenizer: Any) -> list[str]:
    try:
        decoder = tokenizer.get_added_tokens_decoder()
        return [tok.content for _, tok in sorted(decoder.items()) if tok.special][:20]
    except AttributeError:  # pragma: no cover - very old tokenizers
        return []


def open_huggingface(path: str | Path, *, eod_token: Optional[str] = None) -> TokenizerFile:
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
    if eod_token is not None:
        eod = tokenizer.token_to_id(eod_token)
        if eod is None:
            raise ValueError(
                f"eod_token {eod_token!r} is not in the vocabulary of {str(path)!r}. Pass a "
                f"token that exists (special tokens: {hf_special_tokens(tokenizer)})."
            )
    else:
        eod = hf_first_id(tokenizer, HF_EOD_CANDIDATES)
        if eod is None:
            raise ValueError(
                f"cannot find an end-of-document token in {str(path)!r}: none of "
                f"{list(HF_EOD_CANDIDATES)} is in its vocabulary (special tokens: "
                f"{hf_special_tokens(tokenizer)}). Pass it explicitly, e.g. "
                "load_tokenizer('huggingface', path, eod_token='<|im_end|>') or --eod-token."
            )
    pad = hf_first_id(tokenizer, HF_PAD_CANDIDATES)
    bos = hf_first_id(tokenizer, HF_BOS_CANDIDATES)
    return TokenizerFile(
        "huggingface", path.resolve(), tokenizer,
        int(tokenizer.get_vocab_size(with_added_tokens=True)), int(eod),
        -1 if pad is None or pad == eod else int(pad), -1 if bos is None else int(bos),
        eod_token=eod_token if eod_token is not None else tokenizer.id_to_token(eod))


def open_tokenizer(kind: str, path: str | Path, **kw: Any) -> TokenizerFile:
    """Open a tokenizer file of ``kind`` (aliases ``spm``, ``sp``, ``hf``) without megatron."""
    kind = canonical_kind(kind, path)
    if kind == "sentencepiece":
        if kw:
            raise ValueError(f"sentencepiece tokenizers take no options, got {sorted(kw)}")
        return open_sentencepiece(path)
    return open_huggingface(path, **kw)
