"""YAML recipes -> ``RunConfig``: ``base:`` inheritance, dotted CLI overrides, strict typed keys.

A recipe may name one or more ``base:`` recipes (paths relative to itself); keys merge depth-first,
the child winning. Overrides such as ``optimizer.lr=1e-3`` are parsed as YAML scalars and applied
last. Every key remembers where it was set, so any error names that file (or ``command line``).
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

from megatron_tst.config.errors import ConfigError, short_repr
from megatron_tst.config.schema import RunConfig

CLI = "command line"


def load_config(path: Optional[Union[str, Path]], overrides: Iterable[str] = (),
                world_size: Optional[int] = None) -> RunConfig:
    """Load, merge, override, type-check and validate a recipe."""
    tree: dict = {}
    sources: dict[str, str] = {}
    if path is not None:
        tree = _load_yaml_tree(Path(path), sources, chain=())
    sources.update(apply_overrides(tree, overrides))
    return build_config(tree, sources, world_size=world_size)


def apply_overrides(tree: dict, overrides: Iterable[str]) -> dict[str, str]:
    """Set dotted ``key=value`` overrides in the plain nested dict ``tree`` (in place; each value
    parsed as a YAML scalar, as ``load_config`` does; sections are created as needed).

    Returns ``{key: "command line"}`` for each overridden key: the ``sources`` that
    ``build_config(tree, sources)`` takes, so that its errors name the command line.
    """
    sources: dict[str, str] = {}
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
        sources[key] = CLI
    return sources


def build_config(tree: dict, sources: Optional[dict[str, str]] = None,
                 world_size: Optional[int] = None) -> RunConfig:
    """Typed ``RunConfig`` from a plain nested dict (a recipe, or one saved in a checkpoint)."""
    sources = sources or {}
    cfg = _build(RunConfig, tree, "", sources)
    try:
        cfg.validate(world_size)
    except ConfigError as err:
        raise err.with_source(_source_of(err.key, sources)) from None
    cfg._key_sources = dict(sources)  # for errors found later (data checks): config_source()
    return cfg


def config_source(cfg: RunConfig, key: str) -> Optional[str]:
    """The recipe file (or ``command line``) that set ``key`` in ``cfg``, if it was loaded here."""
    return _source_of(key, cfg._key_sources)


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


# ------------------------------------------------------------------------------------ YAML files
class _RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (YAML would silently
    keep the last one, so an edit to the first would do nothing)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key_node.value!r} appears twice in one mapping "
                        f"(first on line {seen[key_node.value] + 1}) and YAML keeps only the last; "
                        f"remove one of them", key_node.start_mark)
                seen[key_node.value] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: ``line L, column C: problem (context)``."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        context = f" ({err.context} on line {err.context_mark.line + 1})" if (
            err.context and err.context_mark is not None) else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}{context}"
    return str(err)


def _parse_yaml(text: str):
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def _load_yaml_tree(path: Path, sources: dict[str, str], chain: tuple) -> dict:
    named_by = f" (named as base by {chain[-1]})" if chain else ""
    if path.is_dir():
        raise ConfigError(f"the recipe {path}{named_by} is a directory; give a .yaml file")
    path = path.resolve() if path.exists() else path
    if path.exists() and not path.is_file():
        raise ConfigError(f"the recipe {path}{named_by} is not a regular file (a device, a pipe "
                          f"or a socket); give a .yaml file")
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the working directory {Path.cwd()})"
        raise ConfigError(f"recipe file not found: {path}{where}{named_by}; check the path")
    if path in chain:
        raise ConfigError(f"recipe inheritance cycle: {' -> '.join(map(str, chain + (path,)))}; "
                          f"remove one of these base: entries")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
    except OSError as err:
        fix = "check its permissions" if err.errno == errno.EACCES else "check the file"
        raise ConfigError(f"{path}: cannot read the recipe ({err.strerror or err}); {fix}") from None
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as err:
        hint = ("; fix the syntax there (indentation, a ':' after each key, quotes around "
                "values that hold ': ' or ' #')"
                if isinstance(err, (yaml.scanner.ScannerError, yaml.parser.ParserError)) else "")
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}{hint}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections (model:, training:, "
                          f"...), got a {type(data).__name__}: {short_repr(data)}")
    raw = data.pop("base", None)
    bases = [] if raw is None else [raw] if isinstance(raw, str) else raw
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: base must be a recipe path or a list of recipe paths, got "
                          f"{short_repr(raw)}")
    tree: dict = {}
    for base in bases:
        _merge(tree, _load_yaml_tree(path.parent / base, sources, chain + (path,)))
    _merge(tree, data)
    for key in _flat_keys(data):
        sources[key] = str(path)
    return tree


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _flat_keys(tree: dict, prefix: str = "") -> Iterable[str]:
    for key, value in tree.items():
        full = f"{prefix}{key}"
        yield full
        if isinstance(value, dict):
            yield from _flat_keys(value, full + ".")


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value "
                          f"(e.g. optimizer.lr=1e-3)", source=CLI)
    try:
        value = _parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {}
        tree = node
    tree[parts[-1]] = value


def _source_of(key: Optional[str], sources: dict[str, str]) -> Optional[str]:
    key = key.partition("[")[0] if key else key  # data.train_paths[0] -> data.train_paths
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return None


# ------------------------------------------------------------------------------ typed building
def _build(cls: type, tree: Any, prefix: str, sources: dict[str, str]):
    if not isinstance(tree, dict):
        raise ConfigError(f"expected a section: a mapping of {cls.__name__} keys",
                          key=prefix.rstrip(".") or None, value=tree,
                          source=_source_of(prefix.rstrip("."), sources))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            near = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'?" if near else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown key; {hint}", key=full, value=value,
                              source=_source_of(full, sources))
        kwargs[key] = _coerce(hints[key], value, full, sources)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, sources: dict[str, str]) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"expected {expected}", key=key, value=value, source=_source_of(key, sources))

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        # An empty section (``model:`` with every key commented out) is YAML null: no keys.
        return _build(tp, {} if value is None else value, key + ".", sources)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, sources)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            by_lower = {str(c).lower(): c for c in choices}
            near = difflib.get_close_matches(str(value).lower(), list(by_lower), n=1)
            hint = f" (did you mean {by_lower[near[0]]!r}?)" if near else ""
            raise bad(f"one of {', '.join(map(repr, choices))}{hint}")
        return value
    if origin is dict:  # megatron.* pass-through: names checked by config/passthrough.py
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a mapping of megatron-core field names to values")
        return dict(value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad(f"a list of {inner.__name__}")
        return [_coerce(inner, v, f"{key}[{i}]", sources) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise bad("a number") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        else:
            try:
                number = float(value)
            except OverflowError:  # an integer beyond the float range
                raise bad("a finite number") from None
        if not math.isfinite(number):
            raise bad("a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a schema bug, not user input
