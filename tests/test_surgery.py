"""Surgery: removing a group equals zeroing it; pruned checkpoints reload with identical logits."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import parameter_counts
from gqaprune.models.hf_code.modeling_gqaprune import EmptyAttention, EmptyMLP
from gqaprune.models.loading import load_model
from gqaprune.models.random_models import TINY_PRESETS, build_model
from gqaprune.models.units import LayerKeep
from gqaprune.pruning.surgery import prune_model, save_pruned

IDS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def zero_attention_group(model, layer, group):
    """Zero what group ``group`` of ``layer`` contributes: its o_proj input columns."""
    geo = get_adapter(model.config).geometry(model.config)
    width = geo.q_per_kv * geo.head_dim
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight[:, group * width:(group + 1) * width] = 0


def zero_mlp_channel(model, layer, channel):
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight[:, channel] = 0


def full_keep(model, layer):
    geo = get_adapter(model.config).geometry(model.config)
    return LayerKeep(attn=list(range(geo.num_kv_heads)), mlp=list(range(geo.intermediate_size)))


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_removing_attention_group_equals_zeroing_it(preset):
    model = build_model(preset)
    reference = copy.deepcopy(model)
    geo = get_adapter(model.config).geometry(model.config)
    group = geo.num_kv_heads - 1
    zero_attention_group(reference, 1, group)
    keep = full_keep(model, 1)
    keep.attn.remove(group)
    prune_model(model, {1: keep})
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)
    # and the group really mattered
    assert not torch.allclose(logits(model), logits(build_model(preset)), atol=1e-5)


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_removing_mlp_channels_equals_zeroing_them(preset):
    model = build_model(preset)
    reference = copy.deepcopy(model)
    for c in (0, 5, 7):
        zero_mlp_channel(reference, 0, c)
    keep = full_keep(model, 0)
    keep.mlp = [c for c in keep.mlp if c not in (0, 5, 7)]
    prune_model(model, {0: keep})
    assert model.model.layers[0].mlp.down_proj.in_features == model.config.intermediate_size - 3
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)


def test_emptied_blocks_and_removed_layer():
    model = build_model("tiny-llama-gqa4")
    reference = copy.deepcopy(model)
    before = parameter_counts(model, get_adapter(model.config), get_adapter(model.config).geometry(model.config))
    with torch.no_grad():
        reference.model.layers[0].self_attn.o_proj.weight.zero_()   # layer 0: attention gone
        reference.model.layers[2].mlp.down_proj.weight.zero_()      # layer 2: MLP gone
    del reference.model.layers[1]                                   # layer 1: removed
    reference.config.num_hidden_layers = 3
    for i, layer in enumerate(reference.model.layers):
        layer.self_attn.layer_idx = i
    geo = get_adapter(model.config).geometry(model.config)
    report = prune_model(model, {
        0: LayerKeep(attn=[], mlp=list(range(geo.intermediate_size))),
        1: LayerKeep(attn=[], mlp=[]),
        2: LayerKeep(attn=list(range(geo.num_kv_heads)), mlp=[]),
    })
    assert report.removed_layers == [1] and report.kept_layers == [0, 2, 3]
    assert isinstance(model.model.layers[0].self_attn, EmptyAttention)
    assert isinstance(model.model.layers[1].mlp, EmptyMLP)
    assert model.config.num_hidden_layers == 3
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)
    after = parameter_counts(model, get_adapter(model.config), geo)
    removed = 2 * geo.num_kv_heads * geo.attn_group_cost + 2 * geo.intermediate_size * geo.mlp_channel_cost
    assert before.total - after.total == removed + before.layer_extra


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_save_reload_both_ways_and_generate(preset, tmp_path):
    model = build_model(preset)
    geo = get_adapter(model.config).geometry(model.config)
    plan = {0: LayerKeep(attn=list(range(geo.num_kv_heads))[:-1] or [], mlp=list(range(0, geo.intermediate_size, 2))),
            1: LayerKeep(attn=[], mlp=list(range(8)))}
    prune_model(model, plan)
    expected = logits(model)
    out = save_pruned(model, None, tmp_path / "pruned", info={"source": preset})
    config = json.loads((out / "config.json").read_text())
    assert config["gqaprune_layers"][1]["num_key_value_heads"] == 0
    assert (out / "modeling_gqaprune.py").is_file() and (out / "model.safetensors").is_file()
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(remote).__name__.startswith("Pruned")
    assert torch.equal(logits(remote), expected)
    own = load_model(out).eval()
    assert torch.equal(logits(own), expected)
    generated = remote.generate(IDS[:1, :4], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)
    # greedy generation with the cache equals argmax over a full forward pass
    full = logits(remote, generated[:, :-1]).argmax(-1)
    assert torch.equal(full[:, 3:], generated[:, 4:])


def test_uniform_pruning_gives_standard_config(tmp_path):
    model = build_model("tiny-llama-gqa4")
    geo = get_adapter(model.config).geometry(model.config)
    keep = LayerKeep(attn=[1], mlp=list(range(0, geo.intermediate_size, 2)))
    report = prune_model(model, {i: keep for i in range(geo.num_layers)})
    assert report.uniform
    out = save_pruned(model, None, tmp_path / "uniform")
    config = json.loads((out / "config.json").read_text())
    assert "gqaprune_layers" not in config and "auto_map" not in config
    assert config["num_key_value_heads"] == 1 and config["num_attention_heads"] == 4
    assert not (out / "modeling_gqaprune.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(plain), logits(model))


def test_streamed_checkpoint_shards_reload_identically(tmp_path):
    """The streaming writer's sharded layout (index + shards) loads in transformers with equal logits."""
    from gqaprune.models.checkpoint import INDEX, save_model

    model = build_model("tiny-qwen2-gqa7")
    prune_model(model, {0: LayerKeep(attn=[0], mlp=list(range(0, 72, 2)))})
    save_model(model, tmp_path / "sharded", max_shard_bytes=20_000)  # many shards
    save_model(model, tmp_path / "again", max_shard_bytes=20_000)
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "sharded" / INDEX).is_file()
    for a in shards:  # equal content, equal bytes
        assert a.read_bytes() == (tmp_path / "again" / a.name).read_bytes()
    reloaded = load_model(tmp_path / "sharded")
    assert torch.equal(logits(reloaded), logits(model))


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_fast_loader_equals_from_pretrained(preset, tmp_path):
    """Meta build + safetensors read onto the device gives transformers' model, dense and pruned."""
    model = build_model(preset)
    model.save_pretrained(tmp_path / "dense")
    fast = load_model(tmp_path / "dense")
    slow = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert torch.equal(logits(fast), logits(slow))
    assert fast.get_output_embeddings().weight.data_ptr() == fast.get_input_embeddings().weight.data_ptr() or (
        not model.config.tie_word_embeddings)
    bf16 = load_model(tmp_path / "dense", "bfloat16", "cpu")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    prune_model(model, {0: LayerKeep(attn=[0], mlp=list(range(0, model.config.intermediate_size, 3))),
                        1: LayerKeep(attn=[], mlp=list(range(8)))})
    save_pruned(model, None, tmp_path / "pruned")
    assert torch.equal(logits(load_model(tmp_path / "pruned")), logits(model))
