"""Configs are Python files (`configs/X.py` with `get_config(arg=None)` returning an
ml_collections.ConfigDict), loaded as `configs/X.py` or `configs/X.py:ARG`, with command-line
overrides `--config.section.key=value`.

Every key is checked before any work starts: an unknown key is an error that names it and
suggests close matches; each section becomes a frozen dataclass that validates its values.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
from typing import Any, Mapping, Sequence, TypeVar

import ml_collections

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def unknown_key_error(key: str, where: str, choices, unknown: str | None = None) -> ConfigError:
    """`key` is the full dotted key; `unknown` the part of it that does not exist."""
    unknown = unknown or key.split(".")[-1]
    return ConfigError(
        f"unknown config key {key!r} in {where}{_suggest(unknown, choices)} "
        f"(allowed: {', '.join(sorted(choices))})"
    )


def load_config(spec: str, overrides: Sequence[str] = (),
                schema: Mapping[str, type] | None = None) -> ml_collections.ConfigDict:
    """Load `path.py[:arg]`, apply overrides ('section.key=value'), return a locked ConfigDict.

    `schema` maps section names to their dataclasses: a section's fields the file leaves out
    are filled with their defaults first, so every real key can be overridden (and typos
    still cannot)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config(arg=None) function")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    for name, cls in (schema or {}).items():
        fill_defaults(config, name, cls)
    for item in overrides:
        apply_override(config, item)
    config.lock()
    return config


def fill_defaults(config: ml_collections.ConfigDict, name: str, cls: type) -> None:
    """Add dataclass `cls`'s defaults for the fields section `name` of `config` does not set."""
    if name not in config:
        config[name] = ml_collections.ConfigDict()
    values = config[name]
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line arguments -> (`--config.a.b=value` overrides, the other arguments)."""
    overrides = [a for a in argv if a.startswith("--config.")]
    return overrides, [a for a in argv if not a.startswith("--config.")]


def parse_size(text: str, option: str = "--size") -> tuple[int, int]:
    """An HxW command-line size as (height, width)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"{option} must be HxW, got {text!r}") from None
    return h, w


def parse_mesh(text: str, option: str = "--mesh") -> tuple[int, ...]:
    """A data,fsdp,tensor command-line mesh shape (parallel/mesh.py's make_mesh checks it
    against the devices)."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} must be data,fsdp,tensor, got {text!r}") from None


def parse_value(text: str) -> Any:
    """Python literals (numbers, tuples, lists, True/None); anything else is a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Apply 'a.b.c=value' (a leading '--config.' or 'config.' is accepted)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, _, text = item.partition("=")
    for prefix in ("--config.", "config."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            where = ".".join(parts[:depth]) or "the config"
            choices = list(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
            raise unknown_key_error(key, where, choices, unknown=part)
        if depth < len(parts) - 1:
            node = node[part]
    value = parse_value(text)
    old = node[parts[-1]]
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if old is not None and value is not None and type(old) is not type(value):
        raise ConfigError(
            f"override {key}={text!r}: expected {type(old).__name__} like {old!r}, "
            f"got {type(value).__name__}"
        )
    node[parts[-1]] = value


def to_dict(value) -> Any:
    if isinstance(value, ml_collections.ConfigDict):
        return {k: to_dict(v) for k, v in value.items()}
    if isinstance(value, Mapping):
        return {k: to_dict(v) for k, v in value.items()}
    return value


def section(cls: type[T], values: Mapping | None, where: str) -> T:
    """Build dataclass `cls` from a config section, rejecting unknown keys with suggestions."""
    values = to_dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise unknown_key_error(f"{where}.{key}", where, names)
    try:
        return cls(**values)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e


def check_sections(config, allowed: Sequence[str]) -> None:
    for key in config.keys():
        if key not in allowed:
            raise unknown_key_error(key, "the config", allowed)


def read_json(path: str, what: str = "file") -> Any:
    """A JSON file's contents; a missing or malformed file is a ConfigError naming the file
    (and where the syntax breaks), not a bare JSONDecodeError."""
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} cannot be read: {e}") from None
