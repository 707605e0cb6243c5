"""Stage ``evaluate_dense``: what the dense model does, its own stage so experiments reuse it.

Runs every measure of the ``evaluate`` section (:func:`gqaprune.evaluation.suite.evaluate_model`:
perplexity, tasks, HumanEval, held-out instruction NLL, generation health) on the prepared model.
``metrics/dense.json`` is read by ``evaluate``, so it holds only what belongs to the result (model
fingerprint, settings, figures, the dense continuations the pruned ones are compared with; no timing):
equal results give equal bytes and do not re-run ``evaluate``, which refuses a baseline measured with
other settings. The wall time goes to ``metrics/evaluate_dense.json``. A perplexity that is not finite
(float16 overflow) fails the stage.
"""

from __future__ import annotations

from gqaprune.config.sections import Params
from gqaprune.pipeline.artifacts import StageOutputs
from gqaprune.pipeline.inputs import check_seq_len, dense_settings, load_dense
from gqaprune.pipeline.metrics import Timer, finite_perplexities, stage_metrics
from gqaprune.pipeline.stages import CORPORA_DIR, DENSE_PPL, MODEL_DIR
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import write_json


def run(params: Params, out: StageOutputs, ctx: DistContext) -> None:
    """Evaluate the prepared model with every configured measure."""
    from transformers import AutoTokenizer

    from gqaprune.evaluation.suite import evaluate_model, scalars

    timer = Timer()
    e = params.evaluate
    check_seq_len(MODEL_DIR, e.seq_len, "evaluate.seq_len")
    with timer.phase("load"):
        model, fp, _ = load_dense(params, e, ctx)
        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    with timer.phase("evaluate"):
        result = evaluate_model(model, tokenizer, e, CORPORA_DIR, ctx)
    finite_perplexities(result["ppl"], "dense", e.dtype)
    if not ctx.is_main:  # every rank has the result; the main rank writes it
        return
    texts = result.get("generation", {}).get("texts")
    write_json(out(DENSE_PPL), {"fingerprint": fp, "inputs": {"model": fp}, **dense_settings(e), "ppl": result["ppl"],
                                **{k: v for k, v in scalars(result).items() if k not in ("ppl", "log_ppl_se")},
                                **({"generation_texts": texts} if texts else {})})
    stage_metrics(out, "evaluate_dense", timer, {"seconds": result["seconds"]}, ctx=ctx)
