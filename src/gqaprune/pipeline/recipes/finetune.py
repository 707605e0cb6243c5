"""Stage ``finetune``: recovery of the pruned model, by LoRA on instruction data or by distillation.

``lora``: the adapter, and the merged model when asked (on N processes: DDP or FSDP2).
``distill``: the pruned model trained towards the dense model's outputs on calibration text (every
window of the ``distill_corpora`` calibration splits that is not a held-out window); one process.
"""

from __future__ import annotations

import pandas as pd

from gqaprune.config.sections import Params
from gqaprune.data.sources import load_instructions
from gqaprune.export.model_card import card_for_checkpoint, write_model_card
from gqaprune.models.loading import load_model
from gqaprune.pipeline.artifacts import StageOutputs, write_csv
from gqaprune.pipeline.inputs import model_meta
from gqaprune.pipeline.metrics import Timer, stage_metrics
from gqaprune.pipeline.plots import plot_finetune_loss
from gqaprune.pipeline.stages import CORPORA_DIR, FINETUNE_DIR, PLOTS_DIR, PRUNED_DIR
from gqaprune.pruning.surgery import save_pruned
from gqaprune.recovery.lora import finetune_lora, save_adapter
from gqaprune.runtime.distributed import DistContext
from gqaprune.runtime.files import write_json


def run(params: Params, out: StageOutputs, ctx: DistContext) -> None:
    """Train LoRA adapters on the pruned checkpoint (or record that recovery is disabled).

    The merged model is written layer by layer (base weight + LoRA delta, as peft merges), so a
    sharded model is never gathered whole.
    """
    from transformers import AutoTokenizer

    timer = Timer()
    f = params.finetune
    out(FINETUNE_DIR).mkdir(parents=True, exist_ok=True)
    loss_rows: list[dict] = []
    if f.enabled and f.method == "distill":
        _distill(params, out, ctx, loss_rows)
    elif f.enabled:
        model = load_model(PRUNED_DIR, f.dtype, f.device, ctx, params.distributed.placement)
        tokenizer = AutoTokenizer.from_pretrained(PRUNED_DIR)
        records = load_instructions(f.dataset, "train", data_dir=CORPORA_DIR)
        peft_model = finetune_lora(model, tokenizer, records, f.config(), ctx=ctx,
                                   log=lambda step, loss, lr: loss_rows.append({"step": step, "loss": loss, "lr": lr}))
        save_adapter(peft_model, out(FINETUNE_DIR / "adapter"), ctx)
        if f.merge:
            info = dict(getattr(model.config, "gqaprune_info", None) or {}, finetune=_asdict(f))
            save_pruned(peft_model, tokenizer, out(FINETUNE_DIR / "merged"), info, ctx=ctx)
    if not ctx.is_main:  # the main rank writes the rest
        return
    merged = out(FINETUNE_DIR / "merged")
    if merged.is_dir():
        base = model_meta().get("base_model") or "unknown"
        write_model_card(merged, card_for_checkpoint(merged, base_model=base, kind="finetuned", name="merged"))
    write_json(out(FINETUNE_DIR / "status.json"), {"enabled": f.enabled, "method": f.method, "steps": len(loss_rows)})
    losses = pd.DataFrame(loss_rows, columns=["step", "loss", "lr"])
    write_csv(out(PLOTS_DIR / "finetune_loss.csv"), losses)
    plot_finetune_loss(losses, out)
    final = round(float(losses["loss"].iloc[-5:].mean()), 4) if len(losses) else None
    stage_metrics(out, "finetune", timer, {"enabled": f.enabled, "steps": len(loss_rows), "final_loss": final}, ctx)


def _distill(params: Params, out: StageOutputs, ctx: DistContext, loss_rows: list[dict]) -> None:
    """Distil the dense model into the pruned one and save the result as the merged (recovered) model."""
    from transformers import AutoTokenizer

    from gqaprune.data.windows import calibration_text_windows
    from gqaprune.errors import InputError
    from gqaprune.pipeline.inputs import load_dense, load_heldout
    from gqaprune.recovery.distill import DistillConfig, distill

    f = params.finetune
    if ctx.is_distributed:
        raise InputError("finetune.method: distill runs on one process; use finetune.method: lora on several "
                         "(or distributed.nproc_per_node: 1)")
    teacher, fp, _ = load_dense(params, f, ctx)
    student = load_model(PRUNED_DIR, f.dtype, f.device, ctx, params.distributed.placement)
    tokenizer = AutoTokenizer.from_pretrained(PRUNED_DIR)
    heldout = load_heldout(fp) if params.calibrate.heldout_windows else None
    windows = calibration_text_windows(tokenizer, f.distill_corpora, params.calibrate.seq_len, CORPORA_DIR, heldout)
    config = DistillConfig(mode=f.distill_mode, lr=f.distill_lr, batch_size=f.distill_batch_size,
                           max_steps=f.max_steps, max_seconds=f.distill_max_seconds, seed=f.seed)
    student = distill(student, teacher, windows, config,
                      log=lambda step, loss, lr, elapsed: loss_rows.append({"step": step, "loss": loss, "lr": lr}))
    info = dict(getattr(student.config, "gqaprune_info", None) or {}, finetune=_asdict(f))
    save_pruned(student, tokenizer, out(FINETUNE_DIR / "merged"), info)


def _asdict(section) -> dict:
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
