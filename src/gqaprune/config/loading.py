"""Reading params.yaml: types checked against the sections' annotations, every rule run, all errors at once.

:func:`load_params` reads the file and applies ``--set section.key=value`` overrides (the syntax of
``dvc exp run -S``); :func:`parse_params` validates a mapping in two layers, both collected before
anything is raised: the type of every value (:func:`_coerce`), then each section's ``rules()`` and the
checks across sections. :func:`describe` renders a section's keys for ``--help``. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import yaml

from gqaprune.config.sections import Params, ParamsError, cross_errors


# --- typing and building -----------------------------------------------------------------------
class _TypeError(Exception):
    """One value of the wrong type (collected, then reported with the others)."""


def _coerce(value, hint, key: str):
    """Validate / coerce one value against a type hint; raises _TypeError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        first = None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except _TypeError as e:
                first = first or e
        raise first or _TypeError(f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _TypeError(f"{key} must be a list, got {value!r}")
        (inner, *_) = typing.get_args(hint) or (typing.Any,)
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is typing.Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise _TypeError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)  # YAML reads 3e-4 as a string and .inf as float; both land here
        except ValueError:
            raise _TypeError(f"{key} must be a number, got {value!r}") from None
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _TypeError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise _TypeError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise _TypeError(f"{key} must be a string, got {value!r}")
        return value
    raise _TypeError(f"{key}: unsupported annotation {hint!r}")


def _fields(cls) -> dict[str, dataclasses.Field]:
    """Init fields of a dataclass (ClassVars excluded)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _build(cls, raw, prefix: str, errors: list[str]):
    """Instantiate a dataclass from a mapping, collecting unknown keys and type errors into ``errors``."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        errors.append(f"{prefix or 'params.yaml'} must be a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    for name in sorted(set(raw) - set(fields)):
        full = f"{prefix}.{name}" if prefix else name
        errors.append(f"unknown key {full}; {prefix or 'params.yaml'} accepts: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        if name not in fields:
            continue
        hint, full = hints[name], f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, full, errors)
            continue
        try:
            values[name] = _coerce(value, hint, full)
        except _TypeError as e:
            errors.append(str(e))
    return cls(**values)


def parse_params(raw: dict) -> Params:
    """Validate a params mapping (as read from YAML) into :class:`Params`; every problem in one error."""
    errors: list[str] = []
    params = _build(Params, raw, "", errors)
    if not errors:  # range checks assume the types are right
        for section in params.sections():
            errors += section.errors()
        errors += cross_errors(params)
    if errors:
        raise ParamsError("; ".join(errors))
    return params


def _apply_override(raw: dict, assignment: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as YAML) to the raw mapping."""
    if "=" not in assignment:
        raise ParamsError(f"override {assignment!r} is not of the form section.key=value")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ParamsError(f"override key {key!r} must be section.key")
    raw.setdefault(parts[0], {})
    if not isinstance(raw[parts[0]], dict):
        raise ParamsError(f"{parts[0]} must be a mapping")
    raw[parts[0]][parts[1]] = yaml.safe_load(text)


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override (``section.key=value``) and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} does not exist; run from the project folder or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"params file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    for assignment in overrides or []:
        _apply_override(raw, assignment)
    return parse_params(raw)


def describe(cls) -> str:
    """One line per key of a section: name, type and default, for --help texts."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in _fields(cls).values():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, float) and math.isinf(default):
            default = ".inf"
        lines.append(f"{f.name} ({_type_name(hints[f.name])}, default {default!r})")
    return "; ".join(lines)


def _type_name(hint) -> str:
    """Readable name of a type hint."""
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
