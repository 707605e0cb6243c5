"""The pipeline's plots: PNG images (they render offline in ``dvc plots show``) and the CSV data behind them.

Each function writes through a stage's :class:`~gqaprune.pipeline.artifacts.StageOutputs`, so plots are
replaced together with the stage's other outputs.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gqaprune.pipeline.artifacts import StageOutputs, write_csv
from gqaprune.runtime.files import atomic_path

PLOTS_DIR = Path("plots")


def _figure(title: str, xlabel: str, ylabel: str):
    """A new matplotlib figure and axes with labels (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save_png(fig, path: Path) -> None:
    """Save a matplotlib figure atomically as PNG (no timestamp in the metadata)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def plot_kept_fraction(layers: pd.DataFrame, out: StageOutputs) -> None:
    """Per-layer kept fraction of attention groups and MLP channels (CSV + PNG)."""
    frame = pd.DataFrame({
        "layer": layers["layer"],
        "attn_kept_fraction": layers["attn_kept"] / layers["attn_groups"].clip(lower=1),
        "mlp_kept_fraction": layers["mlp_kept"] / layers["mlp_channels"].clip(lower=1),
    })
    write_csv(out(PLOTS_DIR / "kept_fraction.csv"), frame)
    fig, ax = _figure("kept fraction per layer", "layer", "kept fraction")
    width = 0.4
    ax.bar(frame["layer"] - width / 2, frame["attn_kept_fraction"], width, label="attention groups")
    ax.bar(frame["layer"] + width / 2, frame["mlp_kept_fraction"], width, label="MLP channels")
    ax.set_ylim(0, 1.05)
    ax.legend()
    _save_png(fig, out(PLOTS_DIR / "kept_fraction.png"))


def plot_importance(sim: pd.DataFrame, out: StageOutputs) -> None:
    """Layer and block importance (1 - cos) per layer (CSV + PNG)."""
    write_csv(out(PLOTS_DIR / "layer_importance.csv"), sim)
    fig, ax = _figure("layer / block importance (1 - cos)", "layer", "importance")
    for column in ("layer_importance", "attn_importance", "mlp_importance"):
        ax.plot(sim["layer"], sim[column], marker="o", label=column.replace("_", " "))
    ax.legend()
    _save_png(fig, out(PLOTS_DIR / "layer_importance.png"))


def plot_finetune_loss(losses: pd.DataFrame, out: StageOutputs) -> None:
    """Recovery (LoRA or distillation) training loss per optimizer step (PNG)."""
    fig, ax = _figure("recovery: training loss", "step", "loss")
    if len(losses):
        ax.plot(losses["step"], losses["loss"])
    _save_png(fig, out(PLOTS_DIR / "finetune_loss.png"))
