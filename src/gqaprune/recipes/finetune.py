"""Stage ``finetune``: LoRA recovery on instruction data; the adapter, and the merged model when asked."""

from __future__ import annotations

import pandas as pd

from ..artifacts import StageOutputs, write_csv, write_json
from ..data import load_instructions
from ..distributed import DistContext
from ..finetune import finetune_lora, save_adapter
from ..modelcard import card_for_checkpoint, write_model_card
from ..params import Params
from ..placement import load_model
from ..plots import plot_finetune_loss
from ..surgery import save_pruned
from . import CORPORA_DIR, FINETUNE_DIR, PLOTS_DIR, PRUNED_DIR
from .records import Timer, model_meta, stage_metrics


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
    if f.enabled:
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
    write_json(out(FINETUNE_DIR / "status.json"), {"enabled": f.enabled, "steps": len(loss_rows)})
    losses = pd.DataFrame(loss_rows, columns=["step", "loss", "lr"])
    write_csv(out(PLOTS_DIR / "finetune_loss.csv"), losses)
    plot_finetune_loss(losses, out)
    final = round(float(losses["loss"].iloc[-5:].mean()), 4) if len(losses) else None
    stage_metrics(out, "finetune", timer, {"enabled": f.enabled, "steps": len(loss_rows), "final_loss": final}, ctx)


def _asdict(section) -> dict:
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
