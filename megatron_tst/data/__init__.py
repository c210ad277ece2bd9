"""Data front end: demo corpus, tokenizers, preprocessing into megatron-core indexed datasets.

Submodules (each one concern):

* :mod:`megatron_tst.data.tokenizer`  - ``SentencePieceTokenizer``, ``HFTokenizer``,
  ``train_sentencepiece``, ``load_tokenizer``
* :mod:`megatron_tst.data.corpus`     - ``Document``, ``demo_documents``, ``split_documents``
* :mod:`megatron_tst.data.preprocess` - ``preprocess``, ``preprocess_documents``, ``DataError``,
  ``PreprocessResult``, CLI glue ``add_preprocess_arguments`` / ``run_preprocess``
* :mod:`megatron_tst.data.demo`       - ``prepare_demo_data``, ``DemoData``

The names are re-exported here lazily (except the ``preprocess`` function, whose name is its
module's: import it from ``megatron_tst.data.preprocess``), so ``import megatron_tst.data`` stays cheap (megatron-core
and torch are imported only when a tokenizer or preprocessing function is first used).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SentencePieceTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer",
    "TokenizerSpec": "tokenizer",
    "train_sentencepiece": "tokenizer",
    "load_tokenizer": "tokenizer",
    "Document": "corpus",
    "demo_documents": "corpus",
    "split_documents": "corpus",
    "DataError": "errors",
    "PreprocessResult": "preprocess",
    "preprocess_documents": "preprocess",
    "add_preprocess_arguments": "preprocess",
    "run_preprocess": "preprocess",
    "DemoData": "demo",
    "prepare_demo_data": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
