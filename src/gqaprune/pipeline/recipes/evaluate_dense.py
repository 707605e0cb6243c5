"""Stage ``evaluate_dense``: perplexity of the dense model, its own stage so experiments reuse it.

``metrics/dense.json`` is read by ``evaluate``, so it holds only what belongs to the result (model
fingerprint, settings, perplexities): equal results give equal bytes and do not re-run ``evaluate``.
The wall time goes to ``metrics/evaluate_dense.json``.
"""

from __future__ import annotations

from gqaprune.config.sections import Params
from gqaprune.evaluation.perplexity import perplexities
from gqaprune.pipeline.artifacts import StageOutputs
from gqaprune.pipeline.inputs import load_dense
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.stages import CORPORA_DIR, DENSE_PPL, MODEL_DIR
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import write_json


def run(params: Params, out: StageOutputs, ctx: DistContext) -> None:
    """Evaluate the prepared model on every configured corpus."""
    from transformers import AutoTokenizer

    timer = Timer()
    e = params.evaluate
    with timer.phase("load"):
        model, fp, _ = load_dense(params, e, ctx)
        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    with timer.phase("evaluate"):
        result = perplexities(model, tokenizer, e.datasets, e.seq_len, e.batch_size, e.max_tokens, CORPORA_DIR, ctx,
                              spread=e.spread)
    if not ctx.is_main:  # every rank has the result; the main rank writes it
        return
    write_json(out(DENSE_PPL), {"fingerprint": fp, "seq_len": e.seq_len, "dtype": e.dtype, "spread": e.spread,
                                "max_tokens": e.max_tokens, "ppl": result})
    stage_metrics(out, "evaluate_dense", timer, ctx=ctx)
