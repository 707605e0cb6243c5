"""The shared nouns of the toolkit, free of torch: group kinds, importance metrics, keep lists, counts.

The planner (a pure table-to-plan step) and the executor (surgery, compensation) both speak these
types; keeping them here lets :mod:`gqaprune.plan` run without importing torch. The group kinds'
member projections are defined once in :mod:`gqaprune.hf_code.gqaprune_layout` (which must stay
standalone because it is saved with checkpoints); ``tests/test_groups.py`` checks the two agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ATTN = "attn"  # attention group: one KV head with its query heads
MLP = "mlp"  # MLP group: one SwiGLU channel
KINDS = (ATTN, MLP)

#: importance metrics, in the column order of the score table
METRICS = ("magnitude", "wanda", "taylor", "taylor_2nd", "fluctuation")
#: metrics that need a backward pass
GRADIENT_METRICS = frozenset({"taylor", "taylor_2nd"})
#: metrics that need forward passes over calibration data (input statistics)
ACTIVATION_METRICS = frozenset({"wanda", "fluctuation"})
#: metrics computed from the whole weights after the calibration pass
WEIGHT_METRICS = frozenset({"magnitude", "wanda", "fluctuation"})


@dataclass
class LayerKeep:
    """Which groups of one layer survive: indices into the layer's *current* groups, ascending."""

    attn: list[int]
    mlp: list[int]


@dataclass(frozen=True)
class LayerShape:
    """How many attention groups (KV heads) and MLP channels one decoder layer currently has."""

    layer: int
    attn_groups: int
    mlp_channels: int


@dataclass(frozen=True)
class ParamCounts:
    """Parameter totals used for ratios: ``total`` includes embeddings and lm_head (once if tied).

    ``layer_extra`` is what a decoder layer holds outside its groups (its two norms): it goes only
    when the whole layer is removed.
    """

    total: int
    embeddings: int
    prunable: int
    layer_extra: int = 0

    def to_dict(self) -> dict:
        """Plain-dict form, for JSON."""
        return asdict(self)

#: storage types of a GGUF export's 2-D weights
GGUF_DTYPES = ("f32", "f16", "bf16")
#: llama.cpp quantisation types offered by :func:`gqaprune.gguf_export.quantize_gguf` (name -> llama_ftype value)
GGUF_QUANT_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "F16": 1, "BF16": 32}

#: Candidate allocations of the adaptive default (``select.allocation: auto``): name -> plan overrides.
#: From pure importance to strong layer-wise similarity priors, plus the same ratio in every layer.
ALLOCATION_CANDIDATES: dict[str, dict] = {
    "T0": {"temperature": 0.0},
    "T0.5-tauinf": {"temperature": 0.5, "tau": float("inf")},
    "T1-tauinf": {"temperature": 1.0, "tau": float("inf")},
    "T2-tauinf": {"temperature": 2.0, "tau": float("inf")},
    "T1": {"temperature": 1.0},
    "uniform": {"strategy": "uniform", "temperature": 0.0},
}
