"""YAML recipes -> ``RunConfig``: ``base:`` inheritance, dotted CLI overrides, strict typed keys.

A recipe may name one or more ``base:`` recipes (paths relative to itself); keys merge depth-first,
the child winning. Overrides such as ``optimizer.lr=1e-3`` are parsed as YAML scalars and applied
last. Every key remembers where it was set, so any error names that file (or ``command line``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

from megatron_tst.config.errors import ConfigError
from megatron_tst.config.schema import RunConfig

CLI = "command line"


def load_config(path: Optional[Union[str, Path]], overrides: Iterable[str] = (),
                world_size: Optional[int] = None) -> RunConfig:
    """Load, merge, override, type-check and validate a recipe."""
    tree: dict = {}
    sources: dict[str, str] = {}
    if path is not None:
        tree = _load_yaml_tree(Path(path), sources, chain=())
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
        sources[key] = CLI
    return build_config(tree, sources, world_size=world_size)


def build_config(tree: dict, sources: Optional[dict[str, str]] = None,
                 world_size: Optional[int] = None) -> RunConfig:
    """Typed ``RunConfig`` from a plain nested dict (a recipe, or one saved in a checkpoint)."""
    sources = sources or {}
    cfg = _build(RunConfig, tree, "", sources)
    try:
        cfg.validate(world_size)
    except ConfigError as err:
        raise err.with_source(_source_of(err.key, sources)) from None
    return cfg


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


# ------------------------------------------------------------------------------------ YAML files
def _load_yaml_tree(path: Path, sources: dict[str, str], chain: tuple) -> dict:
    path = path.resolve() if path.exists() else path
    if not path.is_file():
        hint = f" (named as base by {chain[-1]})" if chain else ""
        raise ConfigError(f"recipe file not found: {path}{hint}; check the path")
    if path in chain:
        raise ConfigError(f"recipe inheritance cycle: {' -> '.join(map(str, chain + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the recipe as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None)
    bases = [] if bases is None else [bases] if isinstance(bases, str) else bases
    tree: dict = {}
    for base in bases:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base must be a path or a list of paths, got {base!r}")
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
        value = yaml.safe_load(raw) if raw.strip() else ""
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
    while key:
        if key in sources:
            return sources[key]
        key = key.rpartition(".")[0]
    return None


# ------------------------------------------------------------------------------ typed building
def _build(cls: type, tree: Any, prefix: str, sources: dict[str, str]):
    if not isinstance(tree, dict):
        raise ConfigError(f"expected a mapping of {cls.__name__} keys, got {tree!r}",
                          key=prefix.rstrip(".") or None, source=_source_of(prefix.rstrip("."), sources))
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
        return _build(tp, value, key + ".", sources)
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
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a schema bug, not user input
