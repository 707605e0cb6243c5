"""The pipeline's stages: what each reads and writes (torch-free), one recipe module per stage.

Layout (every path is a DVC output; the recipes write them through :class:`~gqaprune.artifacts.StageOutputs`)::

    data/corpora/                       prepare      corpora snapshot in the local-mirror layout
    artifacts/model/                    prepare      dense model (safetensors + tokenizer) or a reference to it
    artifacts/model.json                prepare      fingerprint, geometry, parameter counts
    artifacts/calibration/              calibrate    samples.safetensors [n, seq_len], heldout.safetensors
    artifacts/scores/importance.parquet score        one row per group, one column per metric
    artifacts/similarity/               similarity   layer / attn / mlp importance
    artifacts/allocate/                 allocate     allocation.json (the chosen allocation), candidates.csv
    artifacts/plan/                     plan         plan.json, global_group_table.{csv,parquet},
                                                     layer_summary.csv, pruning_analysis.json
    artifacts/pruned/                   surgery      pruned checkpoint
    artifacts/finetune/                 finetune     adapter/, merged/ (when asked), status.json
    artifacts/export/                   export       model-<dtype>.gguf, model-<quant>.gguf, README.md (card)
    metrics/*.json, plots/*             metrics and plots for ``dvc exp show`` / ``dvc plots``
    artifacts/logs/<stage>.log          every stage's log (not an output)

``dvc.yaml`` declares the same outputs; ``tests/test_dvc_yaml.py`` checks that the two agree and that
each stage's code dependencies are exactly the modules its recipe imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import params as P

CORPORA_DIR = Path("data/corpora")  # the snapshot prepare writes; every later stage reads it
ARTIFACTS = Path("artifacts")
(MODEL_DIR, CALIBRATION_DIR, SCORES_DIR, SIMILARITY_DIR, ALLOCATE_DIR, PLAN_DIR, PRUNED_DIR, FINETUNE_DIR, EXPORT_DIR,
 LOG_DIR) = (ARTIFACTS / name for name in ("model", "calibration", "scores", "similarity", "allocate", "plan", "pruned",
                                           "finetune", "export", "logs"))
MODEL_INFO = ARTIFACTS / "model.json"
METRICS_DIR, PLOTS_DIR = Path("metrics"), Path("plots")
DENSE_PPL = METRICS_DIR / "dense.json"
SCORES = SCORES_DIR / "importance.parquet"
SIMILARITY = SIMILARITY_DIR / "similarity.parquet"


@dataclass(frozen=True)
class StageInfo:
    """A stage: one-line summary, the params sections it reads and every path it writes."""

    summary: str
    sections: tuple
    outputs: tuple[str, ...]


_SUMMARIES = {  # the first line of each stage's --help
    "prepare": "Convert, download or reference the dense model into artifacts/model and snapshot the corpora.",
    "calibrate": "Draw tokenised calibration samples from the calibration split.",
    "score": "Score every attention group and MLP channel (magnitude, wanda, taylor, taylor_2nd, fluctuation).",
    "similarity": "Layer and block importance, 1 - cos(input, output), from forward passes.",
    "allocate": "Choose the allocation for the ratio among candidate priors by held-out calibration KL.",
    "plan": "Build the H-GSP plan, the global group table and pruning_analysis.json.",
    "surgery": "Slice the dense model by the plan and save the pruned checkpoint.",
    "finetune": "Recovery of the pruned model: LoRA on instruction data or distillation from the dense model.",
    "evaluate_dense": "Perplexity of the dense model (cached across experiments).",
    "evaluate": "Perplexity of the pruned and finetuned models next to the dense one.",
    "export": "GGUF export (and llama.cpp-quantised copies) of the recovered model, with its model card.",
}
_IO = {  # name: params sections, outputs (its metrics file added), plots (PNG + CSV each); in pipeline order
    "prepare": ((P.PrepareParams, P.DataParams), (MODEL_DIR, MODEL_INFO, CORPORA_DIR), ()),
    "calibrate": ((P.CalibrateParams,), (CALIBRATION_DIR,), ()),
    "score": ((P.ScoreParams,), (SCORES_DIR,), ()),
    "similarity": ((P.SimilarityParams,), (SIMILARITY_DIR,), ("layer_importance",)),
    "allocate": ((P.AllocateParams,), (ALLOCATE_DIR,), ()),
    "plan": ((P.PlanConfig,), (PLAN_DIR,), ("kept_fraction",)),
    "surgery": ((P.SurgeryParams,), (PRUNED_DIR,), ()),
    "finetune": ((P.FinetuneParams,), (FINETUNE_DIR,), ("finetune_loss",)),
    "evaluate_dense": ((P.EvaluateParams,), (DENSE_PPL,), ()),
    "evaluate": ((P.EvaluateParams,), (), ()),
    "export": ((P.ExportParams,), (EXPORT_DIR,), ()),
}
STAGES: dict[str, StageInfo] = {
    name: StageInfo(_SUMMARIES[name], sections, (
        *map(str, outs), str(METRICS_DIR / f"{name}.json"),
        *(str(PLOTS_DIR / f"{plot}.{ext}") for plot in plots for ext in ("png", "csv"))))
    for name, (sections, outs, plots) in _IO.items()
}
#: the stages that load the model: they run on ``distributed.nproc_per_node`` x ``nnodes`` processes
#: (:mod:`gqaprune.distributed`); the others run on one (under torchrun: rank 0, the other ranks idle)
MULTI_PROCESS = frozenset({"score", "similarity", "surgery", "finetune", "evaluate_dense", "evaluate"})
