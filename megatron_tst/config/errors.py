"""The error every configuration problem raises: names the source, the key, the value and the fix."""

from __future__ import annotations

from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration problem found before any work starts.

    ``str(err)`` reads ``<source>: <key>=<value>: <message>``, where source is the YAML file (or
    ``command line``) the key was set in, so the user knows exactly what to edit.
    """

    def __init__(self, message: str, *, key: Optional[str] = None, value: Any = None,
                 source: Optional[str] = None):
        self.message, self.key, self.value, self.source = message, key, value, source
        super().__init__(self._render())

    def with_source(self, source: Optional[str]) -> "ConfigError":
        if source and not self.source:
            self.source = source
            self.args = (self._render(),)
        return self

    def _render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        what = f"{self.key}={self.value!r}: " if self.key is not None else ""
        return f"{where}{what}{self.message}"
