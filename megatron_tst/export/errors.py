"""``ExportError``: a readable checkpoint that cannot be exported as asked, one paragraph.

An ``InputError``, so the CLI prints it as ``megatron-tst: export error: <message>`` and exits with
status 2, like a bad recipe. A checkpoint that cannot be read at all is a ``CheckpointError``
(``training/saved.py``).
"""

from __future__ import annotations

from megatron_tst.config.errors import InputError


class ExportError(InputError):
    """The checkpoint is readable but cannot be exported as asked (unsupported architecture,
    output directory in the way, missing packages)."""

    kind = "export error"
