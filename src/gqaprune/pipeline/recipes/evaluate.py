"""Stage ``evaluate``: perplexity of the pruned and finetuned models next to the cached dense baseline."""

from __future__ import annotations

from gqaprune.config.sections import Params
from gqaprune.errors import InputError
from gqaprune.evaluation.perplexity import perplexities
from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import parameter_counts
from gqaprune.models.loading import load_model
from gqaprune.pipeline.artifacts import ArtifactMismatchError, StageOutputs
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.stages import CORPORA_DIR, DENSE_PPL, FINETUNE_DIR, PLAN_DIR, PRUNED_DIR
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import read_json


def _check_belongs(pruned, dense: dict, analysis: dict, e) -> None:
    """Refuse a dense baseline or plan of another model, or a baseline measured with other settings."""
    source = (getattr(pruned.config, "gqaprune_info", None) or {}).get("source_fingerprint")
    for what, fp in ((f"dense baseline {DENSE_PPL}", dense.get("fingerprint")),
                     (f"plan analysis {PLAN_DIR / 'pruning_analysis.json'}", analysis.get("fingerprint"))):
        if fp != source:
            raise ArtifactMismatchError(f"{what} belongs to model {fp}, the pruned checkpoint to {source}; "
                                        "re-run the pipeline (dvc repro)")
    if (dense.get("seq_len"), dense.get("spread"), dense.get("max_tokens")) != (e.seq_len, e.spread, e.max_tokens) \
            or set(dense.get("ppl", {})) != set(e.datasets):
        raise InputError(f"{DENSE_PPL} was measured with other evaluate settings; re-run evaluate_dense")


def run(params: Params, out: StageOutputs, ctx: DistContext) -> None:
    """Evaluate the pruned (and recovered) checkpoints; write ratios to dense and parameter counts."""
    from transformers import AutoTokenizer

    timer = Timer()
    e = params.evaluate
    dense = read_json(DENSE_PPL)
    analysis = read_json(PLAN_DIR / "pruning_analysis.json")
    tokenizer = AutoTokenizer.from_pretrained(PRUNED_DIR)
    placement = params.distributed.placement
    with timer.phase("load"):
        pruned = load_model(PRUNED_DIR, e.dtype, e.device, ctx, placement)
    _check_belongs(pruned, dense, analysis, e)
    measure = lambda model: perplexities(model, tokenizer, e.datasets, e.seq_len, e.batch_size,  # noqa: E731
                                         e.max_tokens, CORPORA_DIR, ctx, spread=e.spread)
    with timer.phase("evaluate"):
        results = {"dense": dense["ppl"], "pruned": measure(pruned)}
    status = read_json(FINETUNE_DIR / "status.json")
    if status.get("enabled"):
        merged = FINETUNE_DIR / "merged"
        if merged.is_dir():
            tuned = load_model(merged, e.dtype, e.device, ctx, placement)
        else:
            from peft import PeftModel

            tuned = PeftModel.from_pretrained(pruned, FINETUNE_DIR / "adapter").eval()
        with timer.phase("evaluate"):
            results["finetuned"] = measure(tuned)
    if not ctx.is_main:  # every rank has the results; the main rank writes them
        return
    adapter = get_adapter(pruned.config)
    params_after = parameter_counts(pruned, adapter, adapter.geometry(pruned.config)).total
    stage_metrics(out, "evaluate", timer, {
        "seq_len": e.seq_len,
        "params_before": analysis["params_before"],
        "params_after": params_after,  # the real checkpoint: bias compensation adds a few parameters
        "ratio_total": round(analysis["ratio_total"], 5),
        "ratio_prunable": round(analysis["ratio_prunable"], 5),
        "ppl": {model: {name: r["ppl"] for name, r in per.items()} for model, per in results.items()},
        "log_ppl_se": {model: {name: r["log_ppl_se"] for name, r in per.items()} for model, per in results.items()},
        "ppl_ratio_to_dense": {
            model: {name: round(r["ppl"] / results["dense"][name]["ppl"], 4) for name, r in per.items()
                    if name in results["dense"]}
            for model, per in results.items() if model != "dense"
        },
        "tokens_evaluated": {name: r["tokens"] for name, r in results["pruned"].items()},
        "spread": e.spread,
        "capped": any(r["capped"] for r in results["pruned"].values()),
    }, ctx)
