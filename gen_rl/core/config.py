"""Typed configs: nested dataclasses loaded from YAML, dotted command-line overrides, checked on load.

Any dataclass tree works (the generation trainer's tree is in ``gen_rl/trainer_config.py``); every field is
declared with ``option(default, "one-line doc with its unit")`` so that ``describe`` can print the reference.
Unknown keys fail with the closest valid name; values are checked against the field's type. A root config
class may declare ``renamed_keys: ClassVar[dict[str, str]]`` (old dotted key -> new dotted key): a YAML or
override that still uses an old key fails with one line naming the new one (``check_renamed_keys``).

Relative paths in a YAML (prompt files, data files, output folders, weights) resolve against the working
directory, not the YAML's folder; ``resolve_path`` does it and every file error shows the resolved path.
Importing this module imports PyYAML only (no torch), so a bad config is reported in well under a second.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key, the problem and the fix."""


def resolve_path(value: str | Path) -> Path:
    """Absolute form of a path from a config: ``~`` expanded, relative paths taken from the working directory."""
    return Path(os.path.abspath(Path(value).expanduser()))


def option(default: Any, doc: str) -> Any:
    """A dataclass field with a one-line ``doc`` (shown by ``describe``); mutable defaults are copied."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: _copy(value), metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(item) for item in value]
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    return value


def section(cls: type) -> Any:
    """A nested config section field, defaulting to ``cls()``."""
    return dataclasses.field(
        default_factory=cls, metadata={"doc": (cls.__doc__ or "").strip().split("\n")[0]}
    )


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build ``cls`` from a plain mapping, recursing into nested dataclasses; unknown keys are errors."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where or 'config'} must be a mapping of keys to values, got {type(data).__name__}"
        )
    check_renamed_keys(cls, data, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(key, list(fields), where))
    values = {name: _coerce(hints[name], data[name], _join(where, name)) for name in fields if name in data}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{where or 'config'}: {error}") from error


def check_renamed_keys(cls: type, data: dict[str, Any], where: str = "") -> None:
    """Raise a one-line ConfigError for the first key of ``data`` that ``cls.renamed_keys`` lists as renamed.

    ``renamed_keys`` (a ``ClassVar`` of the config class) maps an old dotted key to its new dotted key, both
    relative to ``cls``; the raw mapping is walked (sections and their keys, YAML order) before any dataclass
    is built, so an old key is named as renamed rather than reported as unknown.
    """
    renamed: dict[str, str] = getattr(cls, "renamed_keys", None) or {}
    if not renamed:
        return
    for key in _dotted_keys(data):
        if key in renamed:
            raise ConfigError(
                f"config key {_join(where, key)!r} was renamed to {_join(where, renamed[key])!r}; "
                "rename it in your YAML or command-line override"
            )


def _dotted_keys(data: dict[Any, Any], prefix: str = "") -> list[str]:
    """Every key of a nested mapping as a dotted path, each section before the keys inside it."""
    keys = []
    for key, value in data.items():
        dotted = _join(prefix, str(key))
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, dotted))
    return keys


def _unknown_key_message(key: str, known: list[str], where: str) -> str:
    if isinstance(key, str) and ":" in key and key.partition(":")[0].strip() in known:
        name, _, value = key.partition(":")
        return (
            f"config key {_join(where, key)!r}: YAML needs a space after the colon; write '{name}: {value}'"
        )
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
    hint = f" Did you mean {_join(where, close[0])!r}?" if close else ""
    return f"unknown config key {_join(where, key)!r}.{hint} Valid keys here: {', '.join(known)}."


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(annotation: Any, value: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; ints become floats, lists become tuples where declared."""
    origin = typing.get_origin(annotation)
    if hasattr(annotation, "from_config_mapping"):  # a section whose class depends on its content
        return annotation.from_config_mapping(value, where)
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for candidate in options:
            if candidate is type(None):
                continue
            try:
                return _coerce(candidate, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {annotation}"
        )
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        args = typing.get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where} must have {len(args)} items, got {len(value)}")
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_coerce(arg, item, f"{where}[{i}]") for i, (arg, item) in pairs)
        item_type = args[0] if args else Any
        items = [_coerce(item_type, item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        args = typing.get_args(annotation)
        value_type = args[1] if args else Any
        return {key: _coerce(value_type, item, f"{where}.{key}") for key, item in value.items()}
    return _coerce_scalar(annotation, value, where)


def _coerce_scalar(annotation: Any, value: Any, where: str) -> Any:
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _looks_like_float(value):
        return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation in (str, bool) and isinstance(value, annotation):
        return value
    if annotation in (int, float, str, bool):
        raise ConfigError(f"{where} must be {annotation.__name__}, got {value!r}")
    return value


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=1e-5", "sample.sde_window=[0,4]"]`` -> nested dict; values are parsed as YAML."""
    nested: dict[str, Any] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {override!r} must look like section.key=value (e.g. train.lr=1e-5)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as error:
            problem = getattr(error, "problem", None) or "not valid YAML"
            raise ConfigError(
                f"override {override!r}: the value is not valid YAML ({problem}); quote it or fix the brackets"
            ) from error
        if isinstance(value, str) and _looks_like_float(value):
            value = float(value)  # YAML 1.1 reads 1e-5 as a string
        node = nested
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                earlier = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {override!r} conflicts with an earlier override of {earlier!r}")
        node[parts[-1]] = value
    return nested


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, unreadable or malformed file gives a one-line ConfigError.

    Syntax errors (tab indentation included) name the file, line and column; duplicate keys are errors.
    """
    shown = resolve_path(path)
    if not shown.exists():
        raise ConfigError(f"config file {shown} does not exist; pass --config with a YAML under configs/")
    if not shown.is_file():
        raise ConfigError(f"config file {shown} is not a file; pass --config with a YAML file")
    try:
        text = shown.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {shown} is not UTF-8 text (bad byte at offset {error.start}); save it as UTF-8"
        ) from error
    except OSError as error:
        raise ConfigError(
            f"cannot read config file {shown} ({error.strerror}); check its permissions"
        ) from error
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_error_message(shown, text, error)) from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {shown} must hold a mapping of sections, got {type(data).__name__}")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (not last-one-wins)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (YAML keeps only the last one)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_error_message(path: Path, text: str, error: yaml.YAMLError) -> str:
    """``file:line:column: problem; fix`` for a PyYAML error (its own message spans several lines)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return f"{path}: YAML syntax error: {problem}; fix the file"
    where = f"{path}:{mark.line + 1}:{mark.column + 1}"
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    if "\t" in line[: mark.column + 1]:
        return f"{where}: a tab character in the indentation; YAML indents with spaces only: replace the tab"
    if problem.startswith("duplicate key"):
        return f"{where}: {problem}; remove one of them"
    if problem.startswith("could not determine a constructor for the tag"):
        tag = problem.rsplit(" ", 1)[-1]
        return f"{where}: the tag {tag} is not allowed (configs are plain YAML, loaded safely); remove it"
    return f"{where}: YAML syntax error: {problem}; check the indentation, quotes and brackets there"


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file plus dotted overrides, then run its ``validate()`` if it has one."""
    data = read_yaml(path) if path is not None else {}
    data = merge(data, parse_overrides(overrides))
    config = from_dict(cls, data)
    if hasattr(config, "validate"):
        config.validate()
    return config


def check_finite(config: Any, where: str = "") -> None:
    """Raise a ConfigError naming the first float value (nested dataclasses, lists, dicts) that is NaN or inf."""
    if dataclasses.is_dataclass(config):
        for f in dataclasses.fields(config):
            check_finite(getattr(config, f.name), _join(where, f.name))
    elif isinstance(config, (list, tuple)):
        for index, item in enumerate(config):
            check_finite(item, f"{where}[{index}]")
    elif isinstance(config, dict):
        for key, item in config.items():
            check_finite(item, _join(where, str(key)))
    elif isinstance(config, float) and not math.isfinite(config):
        raise ConfigError(f"{where} is {config}; give a finite number")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that ``from_dict`` reads back to an equal config."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def describe(cls: type, where: str = "") -> list[str]:
    """One line per field: ``section.key: type = default  # doc``, for ``train.py --describe``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = _join(where, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            # a section whose class depends on its content (algorithm) is described by its default's class
            section_class = (
                type(f.default_factory()) if f.default_factory is not dataclasses.MISSING else hints[f.name]
            )
            lines.append(f"[{name}] {f.metadata.get('doc', '')}")
            lines.extend(describe(section_class, name))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = literal_choices(hints[f.name])
        shown = f" (one of: {' | '.join(map(str, choices))})" if choices else ""
        lines.append(f"{name} = {default!r}  # {f.metadata.get('doc', '')}{shown}")
    return lines


def literal_choices(hint: Any) -> tuple[Any, ...]:
    """The values a ``Literal[...]`` type (or ``Literal[...] | None``) allows; empty for other types."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    for argument in typing.get_args(hint):
        if typing.get_origin(argument) is typing.Literal:
            return typing.get_args(argument)
    return ()
