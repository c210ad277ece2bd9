"""The run's tokenizer as Hugging Face files (``tokenizer.json``, ``tokenizer_config.json``).

- A sentencepiece ``.model`` becomes a ``tokenizers`` tokenizer built from the model's own
  settings (BPE merges ranked by piece score, or the unigram scores; byte fallback; the
  normalizer spec: charsmap, extra-whitespace removal, dummy prefix, whitespace escaping), so
  that ``AutoTokenizer`` encodes text exactly as sentencepiece did when the data was made (a
  unigram model may break ties between segmentations of equal score the other way). The
  ``.model`` is copied beside it as ``tokenizer.model``.
- A Hugging Face ``tokenizer.json`` is copied.

In both, the tokenizer adds no special tokens when encoding (no BOS, no EOS), because training
data was tokenized that way (``megatron_tst.data.tokenizer``): a template post-processor that
would add them is removed. The end-of-document token is the EOS token (``generate`` stops on it).
``check_tokenizer`` compares ``AutoTokenizer`` with the run's tokenizer on sample texts.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megatron_tst.export.errors import ExportError
from megatron_tst.export.source import TokenizerLocation

#: Texts the exported tokenizer must encode exactly as the run's tokenizer does.
CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    " leading space, trailing space ",
    "two  spaces,\ttab, new\nline\n\nand an empty line",
    "digits 1234567890 and 3.14159; prices $12.50",
    "Unicode: café, naïve, Straße, 東京, 🙂",
    "Punctuation!? (brackets) [more] {braces} <angle> 'quotes' \"double\"",
)

# sentencepiece's ModelProto piece types and model types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2


@dataclass
class TokenizerIds:
    """What config.json and generation_config.json need to know about the tokenizer."""

    vocab_size: int
    eos: int
    bos: Optional[int]
    pad: Optional[int]
    unk: Optional[int]
    eos_token: str
    bos_token: Optional[str]
    pad_token: Optional[str]
    unk_token: Optional[str]


def write_tokenizer(location: TokenizerLocation, outdir: Path, *,
                    model_max_length: int) -> TokenizerIds:
    """Write the HF tokenizer files of ``location`` into ``outdir``; return its special ids."""
    if location.kind == "sentencepiece":
        tokenizer, ids = _from_sentencepiece(location.path)
        shutil.copyfile(location.path, outdir / "tokenizer.model")
    else:
        tokenizer, ids = _from_huggingface(location)
    tokenizer.save(str(outdir / "tokenizer.json"))
    special = {"eos_token": ids.eos_token}
    for name in ("bos_token", "unk_token", "pad_token"):
        if getattr(ids, name) is not None:
            special[name] = getattr(ids, name)
    (outdir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (outdir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ids


# ------------------------------------------------------------------------------ sentencepiece
def _from_sentencepiece(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
        from tokenizers.models import BPE, Unigram
    except ImportError as err:
        raise ExportError(f"exporting a sentencepiece tokenizer needs the tokenizers and protobuf "
                          f"packages ({err}): pip install -e '.[hf]'") from None
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as err:
        raise ExportError(f"cannot read the sentencepiece model {path}: {err}") from None
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk_id = trainer.unk_id if 0 <= trainer.unk_id < len(pieces) else None
    if trainer.model_type == _BPE:
        normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
        ranked = []
        for piece, (score, i) in normal.items():
            for cut in range(1, len(piece)):
                left, right = piece[:cut], piece[cut:]
                if left in normal and right in normal:
                    ranked.append((-score, i, normal[left][1], left, right))
        merges = [(left, right) for *_, left, right in sorted(ranked)]
        model = BPE(vocab=vocab, merges=merges, unk_token=trainer.unk_piece if unk_id is not None
                    else None, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == _UNIGRAM:
        model = Unigram([(p.piece, p.score) for p in pieces], unk_id, trainer.byte_fallback)
    else:
        raise ExportError(f"the sentencepiece model {path} is of type {trainer.model_type} "
                          f"(word or char); only BPE and unigram models can be exported")
    tokenizer = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))  # sentencepiece always adds it, even before "▁"
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("\u2581", " ")]
    if trainer.byte_fallback:
        decode.append(decoders.ByteFallback())
    decode.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    specials = [p.piece for p in pieces if p.type in (_CONTROL, _UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])

    def piece(i: int) -> Optional[str]:
        return pieces[i].piece if 0 <= i < len(pieces) else None

    if not 0 <= trainer.eos_id < len(pieces):
        raise ExportError(f"the sentencepiece model {path} has no end-of-sentence piece "
                          f"(eos_id={trainer.eos_id}), so there is no end-of-document token")
    valid = lambda i: i if 0 <= i < len(pieces) else None  # noqa: E731
    ids = TokenizerIds(len(pieces), trainer.eos_id, valid(trainer.bos_id), valid(trainer.pad_id),
                       unk_id, piece(trainer.eos_id), piece(trainer.bos_id),
                       piece(trainer.pad_id), piece(trainer.unk_id))
    return tokenizer, ids


# ------------------------------------------------------------------------------- huggingface
def _from_huggingface(location: TokenizerLocation):
    from megatron_tst.data.tokenizer_files import open_huggingface

    try:
        opened = open_huggingface(location.path, eod_token=location.eod_token)
    except (ValueError, OSError, ImportError) as err:
        raise ExportError(f"cannot load the run's tokenizer {location.path}: {err}") from None
    tokenizer = opened.backend
    # No special tokens added on encode, as in training: drop template post-processing.
    spec = json.loads(tokenizer.to_str())
    post = spec.get("post_processor")
    if post and post.get("type") == "TemplateProcessing":
        spec["post_processor"] = None
    elif post and post.get("type") == "Sequence":
        kept = [p for p in post.get("processors", []) if p.get("type") != "TemplateProcessing"]
        spec["post_processor"] = {**post, "processors": kept} if kept else None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(json.dumps(spec))

    def name(i: int) -> Optional[str]:
        return None if i is None or i < 0 else tokenizer.id_to_token(i)

    unk = None
    model = spec.get("model") or {}
    if model.get("unk_token") is not None:
        unk = tokenizer.token_to_id(model["unk_token"])
    elif isinstance(model.get("unk_id"), int):
        unk = model["unk_id"]
    pad = opened.pad if opened.pad >= 0 else None
    bos = opened.bos if opened.bos >= 0 else None
    ids = TokenizerIds(opened.vocab_size, opened.eod, bos, pad, unk, name(opened.eod), name(bos),
                       name(pad), name(unk))
    return tokenizer, ids


# -------------------------------------------------------------------------------------- check
def check_tokenizer(outdir: Path, location: TokenizerLocation,
                    texts: tuple[str, ...] = CHECK_TEXTS) -> list[str]:
    """Texts that ``AutoTokenizer.from_pretrained(outdir)`` encodes differently from the run's
    tokenizer (empty: identical on every sample)."""
    from transformers import AutoTokenizer

    from megatron_tst.data.tokenizer_files import open_tokenizer

    run = open_tokenizer(location.kind, location.path,
                         **({"eod_token": location.eod_token} if location.eod_token else {}))
    hf = AutoTokenizer.from_pretrained(str(outdir))
    differ = []
    for text in texts:
        if run.kind == "sentencepiece":
            expected = list(run.backend.EncodeAsIds(text))
        else:
            expected = run.backend.encode(text, add_special_tokens=False).ids
        if hf.encode(text, add_special_tokens=False, verbose=False) != expected:
            differ.append(text)
    return differ
