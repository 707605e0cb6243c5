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
#: the spellings of infinity a float key accepts as a string (YAML's, and Python's)
_INFINITIES = {sign + word: (-math.inf if sign == "-" else math.inf)
               for sign in ("", "+", "-") for word in (".inf", "inf", "infinity")}

class _TypeError(Exception):
    """One value of the wrong type (collected, then reported with the others)."""


def _coerce(value, hint, key: str):
    """Validate / coerce one value against a type hint; raises _TypeError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        first = matching = None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except _TypeError as e:
                first = first or e
                # a mapping or list given for `str | dict[...]`: the container's own error says what is wrong
                container = typing.get_origin(option)
                if container in (dict, list, tuple) and isinstance(value, dict if container is dict else list | tuple):
                    matching = e
        raise matching or first or _TypeError(f"{key}: bad value {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise _TypeError(f"{key} must be a mapping, got {value!r}")
        key_type, value_type = typing.get_args(hint) or (str, typing.Any)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
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
        text = value.strip().lower() if isinstance(value, str) else None
        if text in _INFINITIES:  # `dvc exp run -S key=.inf` writes the string '.inf' into params.yaml
            return _INFINITIES[text]
        try:
            number = float(value)  # YAML reads 3e-4 as a string and .inf as float; both land here
        except ValueError:
            raise _TypeError(f"{key} must be a number, got {value!r}") from None
        if math.isnan(number):
            raise _TypeError(f"{key} must be a number, got {value!r} (not a number)")
        return number
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


def coerce_fields(cls, values: dict, prefix: str) -> dict:
    """``values`` (keys of section ``cls``, e.g. read back from a JSON artifact, where infinity is ``".inf"``)
    typed as the section's fields; unknown keys and bad values are refused together."""
    errors: list[str] = []
    hints, fields = typing.get_type_hints(cls), _fields(cls)
    out = {}
    for name, value in values.items():
        if name not in fields:
            errors.append(f"unknown key {prefix}.{name}")
            continue
        try:
            out[name] = _coerce(value, hints[name], f"{prefix}.{name}")
        except _TypeError as e:
            errors.append(str(e))
    if errors:
        raise ParamsError("; ".join(errors))
    return out


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


def with_data_dir_resolved(params: Params, path: str | Path) -> Params:
    """``params`` with a relative ``data.data_dir`` resolved against the folder of the params file ``path``
    (as its comment says), so every command finds the same mirror wherever it runs."""
    data_dir = params.data.data_dir
    if data_dir is None or Path(data_dir).expanduser().is_absolute():
        return params
    absolute = str((Path(path).parent / Path(data_dir).expanduser()).absolute())
    return dataclasses.replace(params, data=dataclasses.replace(params.data, data_dir=absolute))


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
