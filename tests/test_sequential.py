"""Sequential (layer-by-layer) compensation on tiny random models of every family."""

import copy

import pytest
import torch

from gqaprune.models.adapters import get_adapter
from gqaprune.models.random_models import TINY_PRESETS, build_model
from gqaprune.models.units import LayerKeep
from gqaprune.pruning.compensation import collect_stats, compensated_outputs
from gqaprune.pruning.sequential_refit import layer_inputs, sequential_prune
from gqaprune.pruning.surgery import prune_model

SAMPLES = torch.randint(0, 128, (40, 32), generator=torch.Generator().manual_seed(5))


def _plan(model):
    """Prune every layer a bit; empty the attention of layer 1 and the MLP of the last layer."""
    adapter = get_adapter(model.config)
    g = adapter.geometry(model.config)
    keep = {}
    for i in range(g.num_layers):
        attn = list(range(1, g.num_kv_heads)) if g.num_kv_heads > 1 else [0]
        mlp = list(range(0, g.intermediate_size, 2))
        if i == 1:
            attn = []
        if i == g.num_layers - 1:
            mlp = []
        keep[i] = LayerKeep(attn=attn, mlp=mlp)
    return keep


def _final_hidden(model):
    with torch.no_grad():
        return model.model(input_ids=SAMPLES).last_hidden_state


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("target", ["dense", "self"])
def test_sequential_prunes_every_family_and_keeps_dense_unchanged(preset, target):
    dense = build_model(preset)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    keep = _plan(dense)
    pruned, report = sequential_prune(dense, keep, SAMPLES, target=target, batch_size=16, progress=False)
    for k, v in dense.state_dict().items():
        assert torch.equal(v, before[k]), k  # the dense model is untouched
    # the same shapes as one-shot surgery with the same plan
    plain = copy.deepcopy(dense)
    prune_model(plain, keep)
    assert {k: v.shape for k, v in pruned.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert report.layer_specs == prune_model(copy.deepcopy(dense), keep).layer_specs
    if get_adapter(dense.config).geometry(dense.config).qkv_bias:  # Qwen2: the q/k/v biases were sliced
        assert pruned.model.layers[0].self_attn.q_proj.bias is not None
    assert torch.isfinite(_final_hidden(pruned)).all()


@pytest.mark.parametrize("target", ["dense", "self"])
def test_first_layer_refit_equals_one_shot_least_squares(target):
    """At layer 0 both streams are the dense one, so the sequential refit is the one-shot refit."""
    dense = build_model("tiny-llama-gqa4")
    keep = {0: LayerKeep(attn=[1], mlp=list(range(0, 96, 3)))}
    stats = collect_stats(dense, SAMPLES, [0], batch_size=4, progress=False)
    oneshot = copy.deepcopy(dense)
    prune_model(oneshot, keep, compensated_outputs(oneshot, keep, stats, "lstsq"))
    seq, _ = sequential_prune(dense, keep, SAMPLES, target=target, batch_size=4, progress=False)
    a, b = oneshot.model.layers[0], seq.model.layers[0]
    torch.testing.assert_close(b.self_attn.o_proj.weight, a.self_attn.o_proj.weight, rtol=1e-4, atol=1e-5)
    # the MLP of layer 0 sees the *refitted* attention's output, so it differs from one-shot, but only a little
    assert b.mlp.down_proj.weight.shape == a.mlp.down_proj.weight.shape
    assert not torch.equal(b.mlp.down_proj.weight, a.mlp.down_proj.weight)


def test_sequential_beats_one_shot_on_the_final_hidden_states():
    dense = build_model("tiny-llama-gqa4")
    keep = _plan(dense)
    stats = collect_stats(dense, SAMPLES, list(keep), batch_size=4, progress=False)
    oneshot = copy.deepcopy(dense)
    prune_model(oneshot, keep, compensated_outputs(oneshot, keep, stats, "lstsq"))
    seq, _ = sequential_prune(dense, keep, SAMPLES, target="dense", batch_size=4, progress=False)
    plain = copy.deepcopy(dense)
    prune_model(plain, keep)
    ref = _final_hidden(dense)
    err = {name: (_final_hidden(m) - ref).pow(2).mean() for name, m in
           (("plain", plain), ("oneshot", oneshot), ("sequential", seq))}
    assert err["sequential"] < 0.9 * err["oneshot"] < 0.9 * err["plain"]


def test_layer_inputs_are_the_embeddings_per_batch():
    model = build_model("tiny-qwen2-gqa7")
    hidden, kwargs = layer_inputs(model, SAMPLES, batch_size=16)
    assert [h.shape[0] for h in hidden] == [16, 16, 8]
    assert len(kwargs) == model.config.num_hidden_layers and len(kwargs[0]) == 3
    torch.testing.assert_close(hidden[0], model.model.embed_tokens(SAMPLES[:16]))
    assert "position_embeddings" in kwargs[0][0]
