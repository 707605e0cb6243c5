"""Stage ``finetune``: recovery of the pruned model, by LoRA or by distillation, on the recovery mix.

The mix (``finetune.mix``; ``auto``: the calibration mix, the model's own uses) gives the training data
by weight: an instruction corpus its training records rendered as the model sees them, a text corpus
windows of its calibration split; held-out records and held-out windows are never trained on.
``lora``: the adapter, and the merged model when asked (on N processes: DDP or FSDP2); instruction
records supervise their answers, text windows every token. ``distill``: the pruned model trained
towards the dense model's outputs on windows of the mix; one process.

``status.json`` and the merged checkpoint's record name the pruned model (its fingerprint) they were
trained from, so evaluate and export refuse a recovery of an older pruned model.
"""

from __future__ import annotations

import pandas as pd

from gqaprune.config.sections import Params
from gqaprune.export.model_card import card_for_checkpoint, write_model_card
from gqaprune.pipeline.artifacts import StageOutputs, write_csv
from gqaprune.pipeline.inputs import checkpoint_record, model_meta, write_checkpoint_record
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.plots import plot_finetune_loss
from gqaprune.pipeline.stages import CALIBRATION_DIR, CORPORA_DIR, FINETUNE_DIR, PLOTS_DIR, PRUNED_DIR
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import content_id, write_json

# transformers, peft and the model code are imported where recovery runs: a disabled finetune records that
# it is off in well under a second (the runner starts no process group for it either)


def run(params: Params, out: StageOutputs, ctx: DistContext) -> None:
    """Train LoRA adapters on the pruned checkpoint (or record that recovery is disabled).

    The merged model is written layer by layer (base weight + LoRA delta, as peft merges), so a
    sharded model is never gathered whole.
    """
    timer = Timer()
    f = params.finetune
    out(FINETUNE_DIR).mkdir(parents=True, exist_ok=True)
    pruned_fp = checkpoint_record(PRUNED_DIR, "surgery")["fingerprint"]
    loss_rows: list[dict] = []
    if f.enabled and f.method == "distill":
        _distill(params, out, ctx, loss_rows, pruned_fp)
    elif f.enabled:
        from transformers import AutoTokenizer

        from gqaprune.models.loading import load_model
        from gqaprune.pruning.surgery import save_pruned
        from gqaprune.recovery.lora import finetune_lora, save_adapter

        model = load_model(PRUNED_DIR, f.dtype, f.device, ctx, params.distributed.placement)
        tokenizer = AutoTokenizer.from_pretrained(PRUNED_DIR)
        records, windows = _lora_data(params, tokenizer)
        peft_model = finetune_lora(model, tokenizer, records, f.config(), ctx=ctx, text_windows=windows,
                                   log=lambda step, loss, lr: loss_rows.append({"step": step, "loss": loss, "lr": lr}))
        save_adapter(peft_model, out(FINETUNE_DIR / "adapter"), ctx)
        if f.merge:
            info = dict(getattr(model.config, "gqaprune_info", None) or {}, finetune=_asdict(f),
                        pruned_fingerprint=pruned_fp)
            save_pruned(peft_model, tokenizer, out(FINETUNE_DIR / "merged"), info, ctx=ctx)
    if not ctx.is_main:  # the main rank writes the rest
        return
    merged, adapter = out(FINETUNE_DIR / "merged"), out(FINETUNE_DIR / "adapter" / "adapter_model.safetensors")
    status = {"enabled": f.enabled, "method": f.method, "steps": len(loss_rows), "inputs": {"pruned": pruned_fp},
              "merged": None, "adapter": content_id(adapter) if adapter.is_file() else None}
    if merged.is_dir():
        status["merged"] = write_checkpoint_record(merged, {"pruned": pruned_fp})
        base = model_meta().get("base_model") or "unknown"
        write_model_card(merged, card_for_checkpoint(merged, base_model=base, kind="finetuned", name="merged"))
    write_json(out(FINETUNE_DIR / "status.json"), status)
    losses = pd.DataFrame(loss_rows, columns=["step", "loss", "lr"])
    write_csv(out(PLOTS_DIR / "finetune_loss.csv"), losses)
    plot_finetune_loss(losses, out)
    final = round(float(losses["loss"].iloc[-5:].mean()), 4) if len(losses) else None
    stage_metrics(out, "finetune", timer, {"enabled": f.enabled, "steps": len(loss_rows), "final_loss": final}, ctx)


def _recovery_mix(params: Params) -> dict[str, float]:
    """``finetune.mix`` as ``{corpus: weight}``; ``auto``: the calibration mix (recorded by calibrate)."""
    import json

    from gqaprune.pipeline.inputs import load_calibration

    if params.finetune.mix != "auto":
        return dict(params.finetune.mix)
    _, meta = load_calibration(model_meta()["fingerprint"])
    return json.loads(meta["mix"])


def _heldout():
    """The held-out calibration windows (never trained on), or None."""
    from gqaprune.pipeline.inputs import load_heldout

    return load_heldout(model_meta()["fingerprint"])[0] if (CALIBRATION_DIR / "heldout.safetensors").is_file() \
        else None


def _lora_data(params: Params, tokenizer):
    """(instruction records, text windows or None) of the recovery mix (:func:`gqaprune.data.windows.recovery_data`),
    the held-out calibration windows excluded."""
    from gqaprune.data.windows import recovery_data

    return recovery_data(tokenizer, _recovery_mix(params), params.calibrate.seq_len, CORPORA_DIR, _heldout())


def _distill(params: Params, out: StageOutputs, ctx: DistContext, loss_rows: list[dict], pruned_fp: str) -> None:
    """Distil the dense model into the pruned one and save the result as the merged (recovered) model."""
    from transformers import AutoTokenizer

    from gqaprune.data.windows import mixed_text_windows
    from gqaprune.errors import InputError
    from gqaprune.models.loading import load_model
    from gqaprune.pipeline.inputs import check_inputs, load_dense
    from gqaprune.pruning.surgery import save_pruned
    from gqaprune.recovery.distill import distill, distill_settings

    f = params.finetune
    if ctx.is_distributed:
        raise InputError("finetune.method: distill runs on one process; use finetune.method: lora on several "
                         "(or distributed.nproc_per_node: 1)")
    # the teacher must be the dense model the student was pruned from
    check_inputs(checkpoint_record(PRUNED_DIR, "surgery").get("inputs"), f"pruned model {PRUNED_DIR}",
                 "calibrate, score, similarity, allocate, plan and surgery", ("model",))
    teacher, fp, _ = load_dense(params, f, ctx)
    student = load_model(PRUNED_DIR, f.dtype, f.device, ctx, params.distributed.placement)
    tokenizer = AutoTokenizer.from_pretrained(PRUNED_DIR)
    windows = mixed_text_windows(tokenizer, _recovery_mix(params), params.calibrate.seq_len, CORPORA_DIR, _heldout())
    student = distill(student, teacher, windows, distill_settings(f),
                      log=lambda step, loss, lr, elapsed: loss_rows.append({"step": step, "loss": loss, "lr": lr}))
    info = dict(getattr(student.config, "gqaprune_info", None) or {}, finetune=_asdict(f),
                pruned_fingerprint=pruned_fp)
    save_pruned(student, tokenizer, out(FINETUNE_DIR / "merged"), info)


def _asdict(section) -> dict:
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
