"""Typed configuration: dataclasses, YAML files and dotted command-line overrides.

A stage config is a tree of ``@dataclass``es. Every field carries its ``--help`` text in
``field(metadata=help_text("..."))``; a field with a fixed set of values is a ``Literal[...]``
(the one place its choices are written; ``typing.get_args`` lists them). Values are merged in
this order: dataclass defaults, the YAML file given with ``--config``, then overrides
(``model.depth=4``, ``--set model.depth=4`` or ``--model.depth 4``). Each value is checked
against the field's type annotation and unknown keys are rejected with the list of valid ones.
A mapping-valued field is replaced by a new value (``data.shards={...}``), while an override
whose key goes into the mapping changes that entry only (``data.shards.k710.path=/new``).
After all merges, a config object that defines ``resolve()`` is replaced by
``cfg.resolve()``: the hook that fills in derived values (e.g. the data section's clip
geometry from the model section), so they follow every override; it must be idempotent, and
a ValueError it raises becomes a ConfigError. Then every dataclass of the tree that defines
``validate()`` is validated.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar, Union

import yaml

from runtime.io import atomic_write_text

T = TypeVar("T")

RESOLVED_CONFIG_NAME = "config.yaml"


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or invalid."""


# ---------------------------------------------------------------------------------------
# Type checking and coercion


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str) -> Any:
    """Return ``value`` converted to annotation ``tp`` or raise ConfigError naming ``where``."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {_type_name(tp)})")
    tp = inner
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _merge(tp(), value, where)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            raise ConfigError(f"{where}: expected a list, got the string {value!r}")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]")
                         for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_choices(cfg: Any, section: str = "") -> None:
    """Raise ValueError naming ``section.field`` when a ``Literal`` field of dataclass ``cfg``
    holds a value outside its choices (``load_config`` checks merged values already; this
    covers a config built in code, for its ``validate()``)."""
    prefix = f"{section}." if section else ""
    for name, tp in _field_types(type(cfg)).items():
        optional, tp = _is_optional(tp)
        value = getattr(cfg, name)
        if typing.get_origin(tp) is not typing.Literal or (optional and value is None):
            continue
        if value not in typing.get_args(tp):
            raise ValueError(f"{prefix}{name}={value!r} is unknown; choose one of "
                             f"{list(typing.get_args(tp))}")


def _merge(cfg: T, updates: dict, where: str = "", reach: int = 0) -> T:
    """Return a copy of dataclass ``cfg`` with the nested mapping ``updates`` applied.

    A mapping-valued field (e.g. ``data.shards``) is replaced by a new value, except by an
    override whose dotted key reaches ``reach`` levels deep, past the field into the mapping
    (``data.shards.k710.path=...``): that changes the one entry and keeps the others.
    """
    if not isinstance(updates, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {updates!r}")
    types_ = _field_types(type(cfg))
    changes = {}
    for key, value in updates.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in types_:
            raise ConfigError(
                f"unknown config key '{path}'; valid keys here: {', '.join(sorted(types_))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = _merge(current, value, path, reach)
        elif (isinstance(current, dict) and isinstance(value, dict)
              and reach > path.count(".") + 1):
            changes[key] = _coerce(_update_mapping(current, value), types_[key], path)
        else:
            changes[key] = _coerce(value, types_[key], path)
    return dataclasses.replace(cfg, **changes)


def _update_mapping(current: dict, update: dict) -> dict:
    """``current`` with the nested entries of ``update`` set (a copy; sub-mappings merged)."""
    merged = dict(current)
    for key, value in update.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = _update_mapping(merged[key], value)
        else:
            merged[key] = value
    return merged


def _validate_tree(cfg: Any, where: str = "") -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _validate_tree(value, f"{where}.{f.name}" if where else f.name)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(f"{where or 'config'}: {err}") from err


# ---------------------------------------------------------------------------------------
# Overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.depth=4"`` -> (["model", "depth"], 4). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse value: {err}") from err
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict:
    out: dict = {}
    node = out
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: invalid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], yaml_path: str | Path | None = None,
                overrides: Iterable[str] = ()) -> T:
    """Build ``cls`` from defaults, an optional YAML file and dotted overrides, then
    ``resolve()`` it (when ``cls`` defines that) and validate."""
    cfg = cls()
    if yaml_path:
        try:
            cfg = _merge(cfg, load_yaml(yaml_path))
        except ConfigError as err:
            raise ConfigError(f"{yaml_path}: {err}") from err
    for text in overrides:
        path, value = parse_override(text)
        try:
            cfg = _merge(cfg, _nest(path, value), reach=len(path))
        except ConfigError as err:
            raise ConfigError(f"override {text!r}: {err}") from err
    resolve = getattr(cfg, "resolve", None)
    if callable(resolve):
        try:
            cfg = resolve()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from err
    _validate_tree(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON."""
    def convert(v):
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v
    return convert(cfg)


def save_resolved_config(cfg: Any, out_dir: str | Path, name: str = RESOLVED_CONFIG_NAME) -> Path:
    """Write the fully resolved config as YAML into ``out_dir`` (atomically)."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------
# Command line


def describe_fields(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Rows ``(dotted_name, type, default, help)`` for every leaf field of ``cls``.

    Raises ConfigError for a field without help text, so undocumented fields cannot ship.
    """
    rows = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        value = getattr(defaults, f.name)
        help_text = f.metadata.get("help", "")
        if dataclasses.is_dataclass(value):
            rows.append((name, "section", None, help_text))
            rows.extend(describe_fields(type(value), prefix=f"{name}."))
            continue
        if not help_text:
            raise ConfigError(f"{cls.__name__}.{f.name} has no help text")
        rows.append((name, _type_name(_field_types(cls)[f.name]), value, help_text))
    return rows


def format_help(cls: type) -> str:
    lines = []
    for name, tname, default, text in describe_fields(cls):
        if tname == "section":
            lines.append(f"\n[{name}]" + (f"  {text}" if text else ""))
        else:
            lines.append(f"  {name} ({tname}, default {default!r})\n      {text}")
    return "\n".join(lines)


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str = "",
                 prog: str | None = None) -> T:
    """Parse a stage's command line into a validated ``cls``.

    Accepted: ``--config FILE``, ``key.sub=value``, ``--set key.sub=value``,
    ``--key.sub value`` / ``--key.sub=value``, and ``--local_rank N`` (appended by the
    ``deepspeed`` launcher; rank discovery reads the environment instead).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Fields (override any as key.sub=value):\n" + format_help(cls))
    parser.add_argument("--config", help="YAML file with values for the fields below")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field (repeatable); same as a bare KEY=VALUE")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an input error (also VIDEO_DEBUG=1)")
    args, rest = parser.parse_known_args(argv)
    overrides = list(args.set)
    i = 0
    while i < len(rest):
        item = rest[i]
        if item.startswith("--"):
            if "=" in item:
                overrides.append(item[2:])
            elif i + 1 < len(rest):
                overrides.append(f"{item[2:]}={rest[i + 1]}")
                i += 1
            else:
                parser.error(f"option {item} needs a value")
        elif "=" in item:
            overrides.append(item)
        else:
            parser.error(f"unexpected argument {item!r} (overrides look like key.sub=value)")
        i += 1
    try:
        return load_config(cls, args.config, overrides)
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: config error: {err}\n")


def help_text(text: str) -> dict:
    """``field(metadata=help_text("..."))``: the field's ``--help`` text."""
    return {"help": text}


def derived(section: T, where: str, **owned: tuple[str, Any]) -> T:
    """Copy of the config section ``section`` (called ``where``) with fields that another
    section owns filled in: ``name=(owner_key, value)``.

    A field left unset (None) takes the owner's value and one set to the same value is kept
    (old YAMLs that state it twice keep working); one set to another value raises ConfigError
    naming both keys.
    """
    changes = {}
    for name, (owner_key, value) in owned.items():
        current = getattr(section, name)
        if current is not None and current != value:
            raise ConfigError(f"{where}.{name}={current!r} disagrees with {owner_key}={value!r}: "
                              f"remove {where}.{name} ({owner_key} states it once)")
        changes[name] = value
    return dataclasses.replace(section, **changes)
