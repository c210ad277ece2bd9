"""``CheckpointError``, ``ExportError``: bad input to ``export`` and ``eval``, one paragraph each.

Both are ``InputError``s, so the CLI prints them as ``megatron-tst: <kind>: <message>`` and exits
with status 2, like a bad recipe.
"""

from __future__ import annotations

from megatron_tst.config.errors import InputError


class CheckpointError(InputError):
    """The path is not a checkpoint this megatron-tst can read (missing, incomplete, unknown
    format, or its tokenizer cannot be found)."""

    kind = "checkpoint error"


class ExportError(InputError):
    """The checkpoint is readable but cannot be exported as asked (unsupported architecture,
    output directory in the way, missing packages)."""

    kind = "export error"
