"""Prunable groups: the units that the plan keeps or removes, with their exact parameter cost.

* attention group i of layer l: KV head i (k/v rows and biases), its r query heads (q rows and
  bias) and the matching o_proj input columns;
* MLP group i of layer l: SwiGLU channel i (gate and up rows, down column).

Shapes are read from the modules themselves, not only from the config, so a model that was already
pruned (fewer groups in some layers, or an emptied block) enumerates correctly too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from torch import nn

from .adapters import FamilyAdapter, Geometry
from .hf_code.modeling_gqaprune import EmptyAttention, EmptyMLP

ATTN = "attn"
MLP = "mlp"
KINDS = (ATTN, MLP)


@dataclass(frozen=True)
class LayerShape:
    """How many attention groups (KV heads) and MLP channels one decoder layer currently has."""

    layer: int
    attn_groups: int
    mlp_channels: int


def layer_shapes(model: nn.Module, adapter: FamilyAdapter, geometry: Geometry) -> list[LayerShape]:
    """Current per-layer group counts, from the weight shapes (an emptied block counts 0)."""
    shapes = []
    for i, layer in enumerate(adapter.layers(model)):
        attn = adapter.attention(layer)
        kv = 0 if isinstance(attn, EmptyAttention) else adapter.attn_projections(layer)[1].out_features
        mlp = adapter.mlp(layer)
        ch = 0 if isinstance(mlp, EmptyMLP) else adapter.mlp_projections(layer)[0].out_features
        shapes.append(LayerShape(i, kv // geometry.head_dim, ch))
    return shapes


def frozen_layers(num_layers: int, freeze_first: int, freeze_last: int) -> set[int]:
    """Indices of the layers that are never pruned."""
    if freeze_first < 0 or freeze_last < 0:
        raise ValueError("freeze_first_n_layers and freeze_last_n_layers must be >= 0")
    return set(range(min(freeze_first, num_layers))) | set(range(max(num_layers - freeze_last, 0), num_layers))


def group_table(shapes: list[LayerShape], geometry: Geometry) -> pd.DataFrame:
    """One row per group of every layer: ``layer``, ``kind`` ('attn'/'mlp'), ``index``, ``cost`` (params).

    Rows are ordered by layer, then attention before MLP, then index; the row order is the join key
    that importance, plan and surgery share.
    """
    parts = []
    for s in shapes:
        for kind, n, cost in (
            (ATTN, s.attn_groups, geometry.attn_group_cost),
            (MLP, s.mlp_channels, geometry.mlp_channel_cost),
        ):
            if n:
                parts.append(
                    pd.DataFrame(
                        {
                            "layer": np.full(n, s.layer, dtype=np.int32),
                            "kind": kind,
                            "index": np.arange(n, dtype=np.int32),
                            "cost": np.full(n, cost, dtype=np.int64),
                        }
                    )
                )
    table = pd.concat(parts, ignore_index=True)
    table["kind"] = pd.Categorical(table["kind"], categories=list(KINDS))
    return table


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters of the model (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass(frozen=True)
class ParamCounts:
    """Parameter totals used for ratios: ``total`` includes embeddings and lm_head (once if tied).

    ``layer_extra`` is what a decoder layer holds outside its groups (its two norms): it goes only
    when the whole layer is removed.
    """

    total: int
    embeddings: int
    prunable: int
    layer_extra: int = 0

    def to_dict(self) -> dict:
        """Plain-dict form, for JSON."""
        return asdict(self)


def parameter_counts(model: nn.Module, adapter: FamilyAdapter, geometry: Geometry) -> ParamCounts:
    """Total, embedding (input + untied output) and prunable (all groups' costs) parameter counts."""
    emb = adapter.embeddings(model).weight.numel()
    if not geometry.tied_embeddings:
        emb += adapter.lm_head(model).weight.numel()
    shapes = layer_shapes(model, adapter, geometry)
    prunable = sum(
        s.attn_groups * geometry.attn_group_cost + s.mlp_channels * geometry.mlp_channel_cost for s in shapes
    )
    first = adapter.layers(model)[0]
    extra = sum(p.numel() for name, p in first.named_parameters() if "norm" in name)
    return ParamCounts(total=count_parameters(model), embeddings=emb, prunable=prunable, layer_extra=extra)
