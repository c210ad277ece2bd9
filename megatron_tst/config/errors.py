"""The errors bad input raises: each names the source, the key, the value and the fix.

``InputError`` is what the CLI reports as one paragraph (``megatron-tst: <kind>: <message>``,
exit status 2) instead of a traceback: ``ConfigError`` for a recipe or override that cannot run,
``megatron_tst.data.errors.DataError`` for data files that cannot be trained on.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any, Optional

#: Bounds on how much of an offending value an error message quotes (a whole section given where
#: a number belongs, a YAML alias bomb, ...): the message stays one short paragraph.
_VALUE_REPR = reprlib.Repr()
_VALUE_REPR.maxstring = 160
_VALUE_REPR.maxother = 160
_VALUE_REPR.maxlist = _VALUE_REPR.maxtuple = _VALUE_REPR.maxset = 8
_VALUE_REPR.maxdict = 6
_VALUE_REPR.maxlevel = 3

MAX_MESSAGE_CHARS = 2000


def one_paragraph(text: str) -> str:
    """``text`` as one paragraph: line breaks (and the indentation after them) become single
    spaces, and the whole is cut at :data:`MAX_MESSAGE_CHARS`."""
    text = re.sub(r"\s*\n\s*", " ", text.strip())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 5] + " ..."
    return text


def short_repr(value: Any) -> str:
    """``repr(value)``, bounded in length and depth (safe on huge or self-similar values)."""
    return _VALUE_REPR.repr(value)


class InputError(ValueError):
    """Bad input found before (or, for data, while) training: the CLI prints it as one paragraph.

    ``str(err)`` reads ``<source>: <key>=<value>: <message>``, where source is the file (or
    ``command line``) the key was set in, so the user knows exactly what to edit.
    """

    kind = "input error"  # what the CLI calls it: megatron-tst: <kind>: <message>

    def __init__(self, message: str, *, key: Optional[str] = None, value: Any = None,
                 source: Optional[str] = None):
        self.message, self.key, self.value, self.source = message, key, value, source
        super().__init__(self._render())

    def with_source(self, source: Optional[str]) -> "InputError":
        if source and not self.source:
            self.source = source
            self.args = (self._render(),)
        return self

    def _render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        what = f"{self.key}={short_repr(self.value)}: " if self.key is not None else ""
        return one_paragraph(f"{where}{what}{self.message}")


class ConfigError(InputError):
    """A configuration problem found before any work starts."""

    kind = "configuration error"
