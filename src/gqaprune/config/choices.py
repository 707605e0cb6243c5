"""Every closed set of values a setting may take, defined once (torch-free).

params validation, ``--help`` and the library read these; nothing else spells them out again.
"""

from __future__ import annotations

#: storage / compute dtypes of a model, by their params name
DTYPES = ("float32", "bfloat16", "float16")

#: importance metrics, in the column order of the score table
METRICS = ("magnitude", "wanda", "taylor", "taylor_2nd", "fluctuation")
#: metrics that need a backward pass
GRADIENT_METRICS = frozenset({"taylor", "taylor_2nd"})
#: metrics that need forward passes over calibration data (input statistics)
ACTIVATION_METRICS = frozenset({"wanda", "fluctuation"})
#: metrics computed from the whole weights after the calibration pass
WEIGHT_METRICS = frozenset({"magnitude", "wanda", "fluctuation"})

#: output compensation after slicing (``sequential``: layer-by-layer refit, one process)
COMPENSATIONS = ("none", "bias", "lstsq", "sequential")
#: how the plan allocates the budget: global H-GSP ranking, the same ratio per layer, whole layers
STRATEGIES = ("hgsp", "uniform", "layer")
PRIOR_NORMS = ("kind", "none")
NORMALIZATIONS = ("none", "standardize")

#: Candidate allocations of ``allocate.mode: auto``: name -> plan overrides. From pure importance
#: to strong layer-wise similarity priors, plus the same ratio in every layer.
ALLOCATION_CANDIDATES: dict[str, dict] = {
    "T0": {"temperature": 0.0},
    "T0.5-tauinf": {"temperature": 0.5, "tau": float("inf")},
    "T1-tauinf": {"temperature": 1.0, "tau": float("inf")},
    "T2-tauinf": {"temperature": 2.0, "tau": float("inf")},
    "T1": {"temperature": 1.0},
    "uniform": {"strategy": "uniform", "temperature": 0.0},
}
#: The candidates that ``allocate.mode: auto`` tries by default: the four that won at some ratio on SmolLM2
#: (10-50 %, benchmarks/QUALITY.md). T1 (with tau at the 25th percentile) and uniform were never chosen and
#: were far behind (1.2-1.9x the winner's KL); they stay above for users who list them.
DEFAULT_ALLOCATION_CANDIDATES: tuple[str, ...] = ("T0", "T0.5-tauinf", "T1-tauinf", "T2-tauinf")
#: what the allocation is judged by on held-out windows
ALLOCATION_CRITERIA = ("kl", "nll")
ALLOCATION_MODES = ("auto", "fixed")

#: Linear layers that get LoRA adapters by default (a pruned layer that lost one simply skips it)
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECOVERY_METHODS = ("lora", "distill")
DISTILL_MODES = ("full", "lora")

#: where a model lives on N ranks (``auto``: replicate when it fits half of one rank's memory)
PLACEMENTS = ("auto", "replicate", "shard")
RDZV_BACKENDS = ("c10d", "static", "etcd", "etcd-v2")

#: storage types of a GGUF export's 2-D weights
GGUF_DTYPES = ("f32", "f16", "bf16")
#: llama.cpp quantisation types offered by the export (name -> llama_ftype value)
GGUF_QUANT_TYPES = {"Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "F16": 1, "BF16": 32}
EXPORT_SOURCES = ("auto", "finetuned", "pruned")

#: what ``calibrate.mix: auto`` (and ``finetune.mix: auto``) means: the model's own uses. A model with a chat
#: template gets its instruction records (rendered through the template) beside plain text; one without, text.
AUTO_MIX_CHAT = {"wikitext2": 0.5, "alpaca": 0.5}
AUTO_MIX_PLAIN = {"wikitext2": 1.0}
