"""The pipeline's stages: what each reads and writes (torch-free), one recipe module per stage.

Layout (every path is a DVC output, cached; the recipes write them through
:class:`~gqaprune.pipeline.artifacts.StageOutputs`)::

    artifacts/source.json               source       what prepare.model names: a local folder's content digest,
                                                     the embedded file's, a hub id and revision
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
    metrics/dense.json                  evaluate_dense  the dense model's measures (no timings): perplexity, tasks...
    artifacts/evaluation/results.json   evaluate     perplexities and ratios (no timings): what export reads
    artifacts/export/                   export       model-<dtype>.gguf, model-<quant>.gguf, README.md (card)
    metrics/*.json, plots/*             metrics and plots for ``dvc exp show`` / ``dvc plots`` (no stage reads
                                                     a metrics file: timings never invalidate a result)
    artifacts/logs/<stage>.log          every stage's log, its lock (<stage>.lock) and the digest cache
                                        (not outputs)

Every artifact records the ids of the inputs it was made from (model fingerprints, content ids of small
files: :func:`gqaprune.pipeline.inputs.input_ids`); every reader checks them.

``dvc.yaml`` is generated from :data:`STAGES` and the recipes' imports (:mod:`gqaprune.pipeline.dvc_file`);
``tests/test_dvc_yaml.py`` checks that the committed file is the generated one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gqaprune.config import sections as P

CORPORA_DIR = Path("data/corpora")  # the snapshot prepare writes; every later stage reads it
ARTIFACTS = Path("artifacts")
(MODEL_DIR, CALIBRATION_DIR, SCORES_DIR, SIMILARITY_DIR, ALLOCATE_DIR, PLAN_DIR, PRUNED_DIR, FINETUNE_DIR, EXPORT_DIR,
 LOG_DIR, EVALUATION_DIR) = (ARTIFACTS / name for name in (
     "model", "calibration", "scores", "similarity", "allocate", "plan", "pruned", "finetune", "export", "logs",
     "evaluation"))
MODEL_INFO = ARTIFACTS / "model.json"
SOURCE_INFO = ARTIFACTS / "source.json"
RESULTS = EVALUATION_DIR / "results.json"
GENERATIONS = EVALUATION_DIR / "generations.md"  # dense and delivered model side by side, for a person
METRICS_DIR, PLOTS_DIR = Path("metrics"), Path("plots")
DENSE_PPL = METRICS_DIR / "dense.json"
SCORES = SCORES_DIR / "importance.parquet"
SIMILARITY = SIMILARITY_DIR / "similarity.parquet"


@dataclass(frozen=True)
class Stage:
    """A stage: what ``--help`` says, the params it reads, its inputs and outputs; dvc.yaml is generated from it.

    ``sections``: the params sections documented in ``--help``; ``params``: the params DVC tracks for it
    (a section, or ``section.key``); ``inputs``: the artifacts it reads (DVC ``deps``; its code deps are
    computed from its recipe's imports, :mod:`gqaprune.pipeline.dvc_file`); ``outs``: the artifacts it
    writes (cached by DVC); ``plots``: ``(name, x, y)`` of each plot (PNG and CSV). Every stage also
    writes ``metrics/<name>.json``. ``multi_process``: it loads the model and runs on
    ``distributed.nproc_per_node`` x ``nnodes`` processes (:mod:`gqaprune.runtime.launch`); the others
    run on one (under torchrun: rank 0, the other ranks idle). ``always_changed``: DVC runs it at every
    ``repro`` (the ``source`` stage: it looks at a folder outside the project; its output changes only when
    the folder's content does). ``switch``: a boolean param that turns the stage off; off, it records that
    and starts no process, loads nothing.
    """

    name: str
    summary: str
    sections: tuple
    params: tuple[str, ...]
    inputs: tuple[Path, ...]
    outs: tuple[Path, ...]
    plots: tuple[tuple[str, str, str], ...] = ()
    multi_process: bool = False
    always_changed: bool = False
    switch: str | None = None  # "section.key" of a boolean that turns the stage's work off (it then records only)

    def loads_model(self, params) -> bool:
        """Whether the stage, run with ``params``, loads the model (and so runs on every configured process): a
        model stage whose ``switch`` is not off."""
        if not self.multi_process:
            return False
        if self.switch is None:
            return True
        section, _, key = self.switch.partition(".")
        return bool(getattr(getattr(params, section), key))

    @property
    def metrics(self) -> Path:
        """``metrics/<name>.json``: timings and figures for ``dvc exp show`` (cached; no stage reads it)."""
        return METRICS_DIR / f"{self.name}.json"

    @property
    def plot_files(self) -> tuple[Path, ...]:
        """The PNG and CSV file of every plot."""
        return tuple(PLOTS_DIR / f"{plot}.{ext}" for plot, _, _ in self.plots for ext in ("png", "csv"))

    @property
    def outputs(self) -> tuple[str, ...]:
        """Every path the stage writes (outs, metrics, plot files): what its run stages and commits together."""
        return (*map(str, self.outs), str(self.metrics), *map(str, self.plot_files))


_MODEL = (MODEL_DIR, MODEL_INFO)
_STAGES = (  # in pipeline order
    Stage("source", "Record what prepare.model names (a local folder's content digest), so DVC sees it change.",
          (P.PrepareParams,), ("prepare.model",), (), (SOURCE_INFO,), always_changed=True),
    Stage("prepare", "Convert, download or reference the dense model into artifacts/model and snapshot the corpora.",
          (P.PrepareParams, P.DataParams),
          ("data", "prepare", "calibrate.mix", "calibrate.heldout_windows", "calibrate.heldout_datasets",
           "evaluate.datasets", "evaluate.instruction_dataset", "finetune.enabled", "finetune.mix"),
          (SOURCE_INFO,), (MODEL_DIR, MODEL_INFO, CORPORA_DIR)),
    Stage("calibrate", "Draw tokenised calibration samples from the calibration split.",
          (P.CalibrateParams,), ("calibrate",), (*_MODEL, CORPORA_DIR), (CALIBRATION_DIR,)),
    Stage("score", "Score every attention group and MLP channel (magnitude, wanda, taylor, taylor_2nd, fluctuation).",
          (P.ScoreParams,), ("score",), (*_MODEL, CALIBRATION_DIR), (SCORES_DIR,), multi_process=True),
    Stage("similarity", "Layer and block importance, 1 - cos(input, output), from forward passes.",
          (P.SimilarityParams,), ("similarity",), (*_MODEL, CALIBRATION_DIR), (SIMILARITY_DIR,),
          (("layer_importance", "layer", "layer_importance"),), multi_process=True),
    Stage("allocate", "Choose the allocation for the ratio among candidate priors by held-out calibration KL.",
          (P.AllocateParams,), ("allocate", "plan", "surgery.compensation", "surgery.ridge", "surgery.batch_size"),
          (*_MODEL, CALIBRATION_DIR, SCORES_DIR, SIMILARITY_DIR), (ALLOCATE_DIR,)),
    Stage("plan", "Build the H-GSP plan, the global group table and pruning_analysis.json.",
          (P.PlanConfig,), ("plan",), (MODEL_INFO, CALIBRATION_DIR, SCORES_DIR, SIMILARITY_DIR, ALLOCATE_DIR),
          (PLAN_DIR,),
          (("kept_fraction", "layer", "mlp_kept_fraction"),)),
    Stage("surgery", "Slice the dense model by the plan and save the pruned checkpoint.",
          (P.SurgeryParams,), ("surgery",), (*_MODEL, CALIBRATION_DIR, PLAN_DIR), (PRUNED_DIR,), multi_process=True),
    Stage("finetune", "Recovery of the pruned model: LoRA on instruction data or distillation from the dense model.",
          (P.FinetuneParams,), ("finetune", "calibrate.seq_len", "calibrate.heldout_windows"),
          (PRUNED_DIR, CORPORA_DIR, *_MODEL, CALIBRATION_DIR), (FINETUNE_DIR,), (("finetune_loss", "step", "loss"),),
          multi_process=True, switch="finetune.enabled"),
    Stage("evaluate_dense", "The dense model measured as evaluate measures the pruned one: perplexity, tasks, "
          "HumanEval, instruction NLL, generation health (cached across experiments).",
          (P.EvaluateParams,), ("evaluate",), (*_MODEL, CORPORA_DIR), (DENSE_PPL,), multi_process=True),
    Stage("evaluate", "The pruned and recovered models measured as evaluate_dense measures the dense one, with "
          "retention (% of dense) and the generations side by side.",
          (P.EvaluateParams,), ("evaluate",), (PRUNED_DIR, FINETUNE_DIR, PLAN_DIR, DENSE_PPL, CORPORA_DIR),
          (EVALUATION_DIR,), multi_process=True),
    Stage("export", "GGUF export (and llama.cpp-quantised copies) of the recovered model, with its model card.",
          (P.ExportParams,), ("export",), (MODEL_INFO, PRUNED_DIR, FINETUNE_DIR, EVALUATION_DIR), (EXPORT_DIR,)),
)
STAGES: dict[str, Stage] = {stage.name: stage for stage in _STAGES}
#: the stages that load the model and run on N processes
MULTI_PROCESS = frozenset(name for name, stage in STAGES.items() if stage.multi_process)
