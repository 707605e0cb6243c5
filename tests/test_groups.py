"""The one definition of a group: layout members, costs and the torch-free nouns agree."""

import pytest
import torch

from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import member_width
from gqaprune.models.hf_code import gqaprune_layout as layout
from gqaprune.models.random_models import TINY_PRESETS, build_model
from gqaprune.models.units import ATTN, KINDS, MLP


def test_schema_kinds_are_the_layout_kinds():
    assert (ATTN, MLP, KINDS) == (layout.ATTN, layout.MLP, layout.KINDS)
    assert set(layout.GROUP_KINDS) == set(KINDS)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_member_widths_add_up_to_the_group_cost(preset):
    model = build_model(preset)
    adapter = get_adapter(model.config)
    geo = adapter.geometry(model.config)
    layer = adapter.layers(model)[0]
    for kind, cost in ((ATTN, geo.attn_group_cost), (MLP, geo.mlp_channel_cost)):
        total = 0
        for member, lin in adapter.members(layer, kind):
            width = member_width(member, geo)
            other = lin.in_features if member.axis == 0 else lin.out_features
            total += width * other + (width if member.axis == 0 and lin.bias is not None else 0)
        assert total == cost, kind


def test_slice_and_resize_agree():
    """What surgery slices and what the saved modeling code builds have the same shapes."""
    model = build_model("tiny-qwen2-gqa7", num_key_value_heads=7)  # 7 KV groups of 1 query head each
    geo = get_adapter(model.config).geometry(model.config)
    sliced = model.model.layers[0]
    layout.slice_block(sliced, "attn", [1, 4], geo.q_per_kv, geo.head_dim)
    layout.slice_block(sliced, "mlp", list(range(0, 72, 3)), geo.q_per_kv, geo.head_dim)
    built = build_model("tiny-qwen2-gqa7", num_key_value_heads=7).model.layers[0]
    layout.resize_block(built, "attn", 2, geo.q_per_kv, geo.head_dim)
    layout.resize_block(built, "mlp", 24, geo.q_per_kv, geo.head_dim)
    shapes = lambda layer: {n: tuple(p.shape) for n, p in layer.named_parameters()}  # noqa: E731
    assert shapes(sliced) == shapes(built)
    kept_rows = layout.group_indices([1, 4], geo.head_dim)
    assert torch.equal(sliced.self_attn.k_proj.bias, build_model("tiny-qwen2-gqa7", num_key_value_heads=7)
                       .model.layers[0].self_attn.k_proj.bias[kept_rows])
