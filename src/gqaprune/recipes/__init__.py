"""The pipeline's stages: what each reads and writes (torch-free), one recipe module per stage.

Layout (every path is a DVC output; the recipes write them through :class:`~gqaprune.artifacts.StageOutputs`)::

    data/corpora/                       prepare      corpora snapshot in the local-mirror layout
    artifacts/model/                    prepare      dense model (safetensors + tokenizer) or a reference to it
    artifacts/model.json                prepare      fingerprint, geometry, parameter counts
    artifacts/calibration/              calibrate    samples.safetensors [n, seq_len] + provenance
    artifacts/scores/importance.parquet score        one row per group, one column per metric
    artifacts/similarity/               similarity   layer / attn / mlp importance
    artifacts/plan/                     plan         plan.json, global_group_table.{csv,parquet},
                                                     layer_summary.csv, pruning_analysis.json
    artifacts/pruned/                   surgery      pruned checkpoint
    artifacts/finetune/                 finetune     adapter/, merged/ (when asked), status.json
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
MODEL_DIR = Path("artifacts/model")
MODEL_INFO = Path("artifacts/model.json")
CALIBRATION_DIR = Path("artifacts/calibration")
SCORES_DIR = Path("artifacts/scores")
SIMILARITY_DIR = Path("artifacts/similarity")
PLAN_DIR = Path("artifacts/plan")
PRUNED_DIR = Path("artifacts/pruned")
FINETUNE_DIR = Path("artifacts/finetune")
LOG_DIR = Path("artifacts/logs")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
DENSE_PPL = METRICS_DIR / "dense.json"
SCORES = SCORES_DIR / "importance.parquet"
SIMILARITY = SIMILARITY_DIR / "similarity.parquet"


@dataclass(frozen=True)
class StageInfo:
    """A stage: one-line summary, the params sections it reads and every path it writes."""

    summary: str
    sections: tuple
    outputs: tuple[str, ...]


def _metrics(name: str) -> str:
    return str(METRICS_DIR / f"{name}.json")


STAGES: dict[str, StageInfo] = {
    "prepare": StageInfo(
        "Convert, download or reference the dense model into artifacts/model and snapshot the corpora.",
        (P.PrepareParams, P.DataParams),
        (str(MODEL_DIR), str(MODEL_INFO), str(CORPORA_DIR), _metrics("prepare"))),
    "calibrate": StageInfo(
        "Draw tokenised calibration samples from the calibration split.", (P.CalibrateParams,),
        (str(CALIBRATION_DIR), _metrics("calibrate"))),
    "score": StageInfo(
        "Score every attention group and MLP channel (magnitude, wanda, taylor, taylor_2nd, fluctuation).",
        (P.ScoreParams,), (str(SCORES_DIR), _metrics("score"))),
    "similarity": StageInfo(
        "Layer and block importance, 1 - cos(input, output), from forward passes.", (P.SimilarityParams,),
        (str(SIMILARITY_DIR), _metrics("similarity"), str(PLOTS_DIR / "layer_importance.png"),
         str(PLOTS_DIR / "layer_importance.csv"))),
    "plan": StageInfo(
        "Build the H-GSP plan, the global group table and pruning_analysis.json.", (P.PlanConfig,),
        (str(PLAN_DIR), _metrics("plan"), str(PLOTS_DIR / "kept_fraction.png"),
         str(PLOTS_DIR / "kept_fraction.csv"))),
    "surgery": StageInfo(
        "Slice the dense model by the plan and save the pruned checkpoint.", (P.SurgeryParams,),
        (str(PRUNED_DIR), _metrics("surgery"))),
    "finetune": StageInfo(
        "LoRA recovery fine-tuning of the pruned model on instruction data.", (P.FinetuneParams,),
        (str(FINETUNE_DIR), _metrics("finetune"), str(PLOTS_DIR / "finetune_loss.png"),
         str(PLOTS_DIR / "finetune_loss.csv"))),
    "evaluate_dense": StageInfo(
        "Perplexity of the dense model (cached across experiments).", (P.EvaluateParams,),
        (str(DENSE_PPL), _metrics("evaluate_dense"))),
    "evaluate": StageInfo(
        "Perplexity of the pruned and finetuned models next to the dense one.", (P.EvaluateParams,),
        (_metrics("evaluate"),)),
}
