"""Contract tests run against every family adapter on tiny random configs."""

import pytest
from transformers import AutoConfig

from gqaprune.errors import UnsupportedModelError
from gqaprune.models.adapters import ADAPTERS, get_adapter
from gqaprune.models.groups import group_table, layer_shapes, parameter_counts
from gqaprune.models.random_models import PRESETS, TINY_PRESETS, build_config, build_model

EXPECTED_RATIO = {"tiny-llama-gqa4": 4, "tiny-llama-gqa3": 3, "tiny-qwen2-gqa7": 7, "tiny-mistral-mha": 1}
# every registered adapter, each with every tiny preset of its family: a new adapter without a tiny
# preset fails test_every_adapter_has_a_tiny_preset instead of going untested
CASES = [(family, preset) for family in sorted(ADAPTERS) for preset in TINY_PRESETS if PRESETS[preset][0] == family]


def test_every_adapter_has_a_tiny_preset():
    assert {family for family, _ in CASES} == set(ADAPTERS)


@pytest.mark.parametrize("family, preset", CASES)
class TestAdapterContract:
    def test_geometry_from_config(self, family, preset):
        config = build_config(preset)
        assert get_adapter(config) is ADAPTERS[family]
        geo = get_adapter(config).geometry(config)
        assert geo.model_type == family
        assert geo.q_per_kv == EXPECTED_RATIO[preset]
        assert geo.head_dim == config.hidden_size // config.num_attention_heads
        assert geo.qkv_bias == (geo.model_type == "qwen2")

    def test_group_costs_match_module_parameters(self, family, preset):
        model = build_model(preset)
        adapter = get_adapter(model.config)
        geo = adapter.geometry(model.config)
        layer = adapter.layers(model)[0]
        attn_params = sum(p.numel() for lin in adapter.attn_projections(layer) for p in lin.parameters())
        mlp_params = sum(p.numel() for lin in adapter.mlp_projections(layer) for p in lin.parameters())
        assert attn_params == geo.num_kv_heads * geo.attn_group_cost  # no o_proj bias in these families
        assert mlp_params == geo.intermediate_size * geo.mlp_channel_cost

    def test_parameter_counts_add_up(self, family, preset):
        model = build_model(preset)
        adapter = get_adapter(model.config)
        geo = adapter.geometry(model.config)
        counts = parameter_counts(model, adapter, geo)
        final_norm = model.model.norm.weight.numel()
        assert counts.total == counts.embeddings + counts.prunable + geo.num_layers * counts.layer_extra + final_norm
        table = group_table(layer_shapes(model, adapter, geo), geo)
        assert int(table["cost"].sum()) == counts.prunable
        assert len(table) == geo.num_layers * (geo.num_kv_heads + geo.intermediate_size)


def test_untied_qwen2_counts_lm_head_as_embedding():
    model = build_model("tiny-qwen2-gqa7")
    adapter = get_adapter(model.config)
    counts = parameter_counts(model, adapter, adapter.geometry(model.config))
    assert counts.embeddings == 2 * model.config.vocab_size * model.config.hidden_size


def test_mha_when_kv_heads_absent():
    config = AutoConfig.for_model("llama", hidden_size=32, num_attention_heads=4, num_hidden_layers=1,
                                  intermediate_size=16)
    del config.num_key_value_heads
    geo = get_adapter(config).geometry(config)
    assert geo.num_kv_heads == 4 and geo.q_per_kv == 1 and geo.head_dim == 8


def test_unsupported_family_names_supported_ones():
    config = AutoConfig.for_model("gpt2")
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(config)
    for family in ADAPTERS:
        assert family in str(err.value)


def test_heads_not_divisible_by_kv_heads_refused():
    config = AutoConfig.for_model("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(UnsupportedModelError, match="num_key_value_heads=4"):
        get_adapter(config)

    def test_setters_and_members(self, family, preset):
        from gqaprune.models.hf_code.gqaprune_layout import GROUP_KINDS, EmptyMLP

        model = build_model(preset)
        adapter = ADAPTERS[family]
        layer = adapter.layers(model)[0]
        for kind, members in GROUP_KINDS.items():
            assert [m.name for m, _ in adapter.members(layer, kind)] == [m.name for m in members]
        adapter.set_block(layer, "mlp", EmptyMLP())
        assert adapter.members(layer, "mlp") == [] and isinstance(adapter.mlp(layer), EmptyMLP)
        adapter.set_layers(model, list(adapter.layers(model))[1:])
        assert len(adapter.layers(model)) == model.config.num_hidden_layers - 1
        assert [adapter.attention(layer).layer_idx for layer in adapter.layers(model)] == list(
            range(model.config.num_hidden_layers - 1))  # KV-cache slots renumbered
