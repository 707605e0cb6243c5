"""Prunable groups: the units that the plan keeps or removes, with their exact parameter cost.

Which rows and columns a group owns is defined once, in :mod:`gqaprune.models.hf_code.gqaprune_layout`
(``GROUP_KINDS``: per kind, the member projections, their axis and how many rows / columns one
group owns); importance scoring, surgery, compensation and the saved modeling code all read it from
there. This module enumerates the groups of a concrete model as a table.

Shapes are read from the modules themselves, not only from the config, so a model that was already
pruned (fewer groups in some layers, or an emptied block) enumerates correctly too.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn

from gqaprune.models.adapters import FamilyAdapter, Geometry
from gqaprune.models.hf_code import gqaprune_layout as layout
from gqaprune.models.hf_code.gqaprune_layout import GROUP_KINDS, OUTPUT, Member, group_indices, unit_width
from gqaprune.models.units import ATTN, KINDS, MLP, LayerShape, ParamCounts

__all__ = ["ATTN", "GROUP_KINDS", "KINDS", "MLP", "OUTPUT", "LayerShape", "Member", "ParamCounts",
           "count_parameters", "group_indices", "group_table", "layer_shapes", "member_width",
           "parameter_counts"]


def member_width(member: Member, geometry: Geometry) -> int:
    """Rows (axis 0) or columns (axis 1) of ``member`` that one group owns."""
    return unit_width(member.unit, geometry.q_per_kv, geometry.head_dim)


def layer_shapes(model: nn.Module, adapter: FamilyAdapter, geometry: Geometry) -> list[LayerShape]:
    """Current per-layer group counts, from the weight shapes (an emptied block counts 0)."""
    return [LayerShape(i, layout.group_count(layer, ATTN, geometry.head_dim),
                       layout.group_count(layer, MLP, geometry.head_dim))
            for i, layer in enumerate(adapter.layers(model))]


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
