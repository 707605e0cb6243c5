"""The units of pruning as plain, torch-free records: group kinds, keep lists, per-layer shapes, counts.

The planner (a table-to-plan step that never imports torch) and the executor (surgery, compensation)
both speak these types. The member projections of each group kind are defined once, in
:mod:`gqaprune.models.hf_code.gqaprune_layout` (standalone, because it is saved with checkpoints);
``tests/test_groups.py`` checks that the kind names here equal the ones there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

ATTN = "attn"  # attention group: one KV head with its query heads
MLP = "mlp"  # MLP group: one SwiGLU channel
KINDS = (ATTN, MLP)


@dataclass
class LayerKeep:
    """Which groups of one layer survive: indices into the layer's *current* groups, ascending."""

    attn: list[int]
    mlp: list[int]


@dataclass(frozen=True)
class LayerShape:
    """How many attention groups (KV heads) and MLP channels one decoder layer currently has."""

    layer: int
    attn_groups: int
    mlp_channels: int


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
