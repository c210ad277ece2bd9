"""docs/recipes.md lists every config key with its real default (and nothing else)."""

import dataclasses
import re

import yaml

from megatron_tst.config.schema import RunConfig
from tests.conftest import REPO


def _keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def test_every_key_is_documented_with_its_default():
    text = (REPO / "docs" / "recipes.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z0-9_.]+)` \| `([^`]*)` \|", text, flags=re.M))
    expected = dict(_keys(RunConfig()))
    assert set(rows) == set(expected), (set(expected) - set(rows), set(rows) - set(expected))
    for key, default in expected.items():
        assert yaml.safe_load(rows[key]) == default, (key, rows[key], default)
