"""``DataError``: input data that cannot be used, named with its file and the fix.

Raised by preprocessing (bad text/JSONL inputs: ``megatron-tst preprocess`` exits 1) and by the
checks of a run's data before training (``megatron_tst.data.checks``: missing, truncated or
mismatched indexed datasets, token ids outside the tokenizer's vocabulary, splits too small for
one sample). ``megatron-tst train`` prints it as one paragraph and exits 2, like a
``ConfigError``.
"""

from __future__ import annotations

from megatron_tst.config.errors import InputError


class DataError(InputError):
    """A problem with input data: the message names the file (and line, key), and how to fix it."""

    kind = "data error"
