"""Stage ``evaluate``: what the pruned and recovered models do, next to the cached dense baseline.

The delivered model (the recovered one when finetune made one, else the pruned one) gets every measure
of the ``evaluate`` section (perplexity, tasks, HumanEval, held-out instruction NLL, generation health;
:func:`gqaprune.evaluation.suite.evaluate_model`), the other one its perplexity; each figure is reported
next to the dense model's with its retention (% of dense, or x dense). ``generations.md`` puts the
dense and the delivered model's greedy continuations side by side for a person to read.

Refused before any model is loaded: a dense baseline of another model than the one the pruned model
was made from, or measured with other settings (dtype, seq_len, max_tokens, spread, datasets); a plan
that is not the one the pruned model was cut by; a recovery (adapter or merged model) trained from
another pruned model. ``artifacts/evaluation/results.json`` holds the results and the ids they were
made from, without timings (what export and the model card read); ``metrics/evaluate.json`` holds the
same figures with the stage's timings, for ``dvc exp show``.
"""

from __future__ import annotations

from gqaprune.config.sections import Params
from gqaprune.errors import InputError
from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import parameter_counts
from gqaprune.models.loading import load_model
from gqaprune.pipeline.artifacts import StageOutputs, check_made_from
from gqaprune.pipeline.inputs import check_inputs, check_seq_len, checkpoint_record, dense_settings, input_ids
from gqaprune.pipeline.metrics import Timer, finite_perplexities, stage_metrics
from gqaprune.pipeline.stages import CORPORA_DIR, DENSE_PPL, FINETUNE_DIR, GENERATIONS, PLAN_DIR, PRUNED_DIR, RESULTS
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import read_json, write_json, write_text


def _check_belongs(dense: dict, pruned: dict, status: dict, e) -> None:
    """Refuse a dense baseline, plan or recovery that does not belong with the pruned checkpoint."""
    check_made_from(f"dense baseline {DENSE_PPL}", dense.get("fingerprint"), pruned.get("inputs", {}).get("model"),
                    "evaluate_dense (or the whole pipeline: dvc repro)", of="dense model",
                    current_is=f"the pruned model in {PRUNED_DIR} was made from")
    check_inputs(pruned.get("inputs"), f"pruned model {PRUNED_DIR}", "surgery", ("plan",))
    wanted = dense_settings(e)
    have = {key: dense.get(key) for key in wanted}
    if have != wanted:
        diff = ", ".join(f"evaluate.{k}: {have[k]!r} there, {wanted[k]!r} here" for k in wanted if have[k] != wanted[k])
        raise InputError(f"{DENSE_PPL} was measured with other evaluate settings ({diff}), so ratios to it would "
                         "compare unlike things; re-run evaluate_dense with these settings")
    if status.get("enabled"):
        check_inputs(status.get("inputs"), f"recovered model {FINETUNE_DIR}", "finetune", ("pruned",))


def run(params: Params, out: StageOutputs, ctx: DistContext) -> None:
    """Evaluate the pruned (and recovered) checkpoints next to the dense baseline; write the results, the
    side-by-side generations and the metrics."""
    from transformers import AutoTokenizer

    from gqaprune.evaluation.generation import side_by_side_markdown
    from gqaprune.evaluation.suite import evaluate_model, retention, scalars

    timer = Timer()
    e = params.evaluate
    dense = read_json(DENSE_PPL)
    analysis = read_json(PLAN_DIR / "pruning_analysis.json")
    pruned_record = checkpoint_record(PRUNED_DIR, "surgery")
    status = read_json(FINETUNE_DIR / "status.json")
    check_seq_len(PRUNED_DIR, e.seq_len, "evaluate.seq_len")
    _check_belongs(dense, pruned_record, status, e)
    inputs = input_ids("pruned", "plan", "dense_ppl", *(["finetune"] if status.get("enabled") else []))
    tokenizer = AutoTokenizer.from_pretrained(PRUNED_DIR)
    placement = params.distributed.placement
    reference = {"generation": {"texts": dense["generation_texts"]}} if "generation_texts" in dense else None
    recovered = bool(status.get("enabled"))
    final = "finetuned" if recovered else "pruned"  # the delivered model: every measure; the other perplexity only
    with timer.phase("load"):
        pruned = load_model(PRUNED_DIR, e.dtype, e.device, ctx, placement)
    with timer.phase("evaluate"):
        results = {"pruned": evaluate_model(pruned, tokenizer, e, CORPORA_DIR, ctx, reference,
                                            perplexity_only=recovered)}
    if recovered:
        merged = FINETUNE_DIR / "merged"
        if merged.is_dir():
            tuned = load_model(merged, e.dtype, e.device, ctx, placement)
        else:
            from peft import PeftModel

            tuned = PeftModel.from_pretrained(pruned, FINETUNE_DIR / "adapter").eval()
        with timer.phase("evaluate"):
            results["finetuned"] = evaluate_model(tuned, tokenizer, e, CORPORA_DIR, ctx, reference)
    for name, result in results.items():
        finite_perplexities(result["ppl"], name, e.dtype)
    if not ctx.is_main:  # every rank has the results; the main rank writes them
        return
    adapter = get_adapter(pruned.config)
    params_after = parameter_counts(pruned, adapter, adapter.geometry(pruned.config)).total
    dense_scalars = {"ppl": {k: r["ppl"] for k, r in dense["ppl"].items()},
                     "log_ppl_se": {k: r["log_ppl_se"] for k, r in dense["ppl"].items()},
                     **{k: dense[k] for k in ("instruction_nll", "instruction_nll_se", "generation", "humaneval",
                                              "tasks") if k in dense}}
    per_model = {"dense": dense_scalars, **{name: scalars(r) for name, r in results.items()}}
    figures = {
        "seq_len": e.seq_len,
        "params_before": analysis["params_before"],
        "params_after": params_after,  # the real checkpoint: bias compensation adds a few parameters
        "ratio_total": round(analysis["ratio_total"], 5),
        "ratio_prunable": round(analysis["ratio_prunable"], 5),
        "final": final,
        "ppl": {model: s["ppl"] for model, s in per_model.items()},
        "log_ppl_se": {model: s["log_ppl_se"] for model, s in per_model.items()},
        "ppl_ratio_to_dense": {model: retention(s, dense_scalars)["ppl_x_dense"]
                               for model, s in per_model.items() if model != "dense"},
        "tokens_evaluated": {name: r["tokens"] for name, r in results["pruned"]["ppl"].items()},
        "spread": e.spread,
        "capped": any(r["capped"] for r in results["pruned"]["ppl"].values()),
        # what the models do: the dense model's figures and the delivered model's, and how much is kept
        "abilities": {"dense": _abilities(dense_scalars), final: _abilities(per_model[final]),
                      "retention": {k: v for k, v in retention(per_model[final], dense_scalars).items()
                                    if k != "ppl_x_dense"}},
    }
    texts = results[final].get("generation", {}).get("texts")
    if texts and reference:
        from gqaprune.data.prompts import CODE_PROMPTS, INSTRUCTION_PROMPTS

        dense_texts = reference["generation"]["texts"]
        doc = side_by_side_markdown(list(INSTRUCTION_PROMPTS) + list(CODE_PROMPTS),
                                    dense_texts["instructions"] + dense_texts["code"],
                                    texts["instructions"] + texts["code"],
                                    f"Dense and {final} model, greedy continuations side by side")
        write_text(out(GENERATIONS), doc)
    else:
        write_text(out(GENERATIONS), "# Generations\n\nGeneration health was not measured "
                                     "(evaluate.generation_max_new_tokens: 0).\n")
    write_json(out(RESULTS), {"inputs": inputs, "settings": dense_settings(e), **figures})
    stage_metrics(out, "evaluate", timer, {**figures, "seconds": {k: r["seconds"] for k, r in results.items()}},
                  ctx)


def _abilities(s: dict) -> dict:
    """The task-level figures of one model's scalars (everything but perplexity)."""
    return {k: v for k, v in s.items() if k not in ("ppl", "log_ppl_se")}
