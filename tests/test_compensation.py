"""Output compensation: lstsq / bias refits reduce the pruned block's output error and save cleanly."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqaprune.models.random_models import build_model
from gqaprune.models.units import LayerKeep
from gqaprune.pruning.compensation import collect_stats, compensated_outputs
from gqaprune.pruning.surgery import prune_model, save_pruned

SAMPLES = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(3))
KEEP = {1: LayerKeep(attn=[1], mlp=list(range(0, 96, 2))), 2: LayerKeep(attn=[1], mlp=list(range(40)))}


def block_outputs(model, layer):
    """Outputs of layer ``layer``'s o_proj and down_proj on SAMPLES."""
    out = {}
    attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
    hooks = [attn.o_proj.register_forward_hook(lambda m, a, o: out.setdefault("o", []).append(o)),
             mlp.down_proj.register_forward_hook(lambda m, a, o: out.setdefault("down", []).append(o))]
    with torch.no_grad():
        model(input_ids=SAMPLES)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.mark.parametrize("method", ["lstsq", "bias"])
@pytest.mark.parametrize("which", ["o", "down"])
def test_compensation_reduces_output_error_on_calibration_data(method, which):
    dense = build_model("tiny-llama-gqa4")
    stats = collect_stats(dense, SAMPLES, [1, 2], batch_size=4, progress=False)
    target = block_outputs(dense, 1)
    # prune one block only, so the pruned projection sees exactly the dense model's inputs
    keep = {1: LayerKeep(attn=[1], mlp=list(range(96)))} if which == "o" else {
        1: LayerKeep(attn=[0, 1], mlp=list(range(0, 96, 2)))}
    plain, fixed = copy.deepcopy(dense), copy.deepcopy(dense)
    prune_model(plain, keep)
    prune_model(fixed, keep, compensated_outputs(fixed, keep, stats, method))
    before, after = block_outputs(plain, 1), block_outputs(fixed, 1)
    err_plain = (before[which] - target[which]).pow(2).mean()
    err_fixed = (after[which] - target[which]).pow(2).mean()
    # least squares must cut the error clearly; a mean shift helps only by the removed mean
    assert err_fixed < (0.9 if method == "lstsq" else 1.0) * err_plain
    if method == "bias":  # the mean output is restored exactly
        assert torch.allclose(after[which].mean((0, 1)), target[which].mean((0, 1)), atol=1e-6)


def test_bias_compensated_checkpoint_reloads(tmp_path):
    model = build_model("tiny-llama-gqa4")
    stats = collect_stats(model, SAMPLES, [1, 2], progress=False)
    report = prune_model(model, KEEP, compensated_outputs(model, KEEP, stats, "bias"))
    assert not report.uniform
    spec = report.layer_specs[1]
    assert spec["o_proj_bias"] and spec["down_proj_bias"]
    out = save_pruned(model, None, tmp_path / "biased")
    assert json.loads((out / "config.json").read_text())["gqaprune_layers"][1]["down_proj_bias"]
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=SAMPLES).logits, model(input_ids=SAMPLES).logits)


def test_lstsq_keeps_a_uniform_plan_standard():
    model = build_model("tiny-llama-gqa4")
    keep = {i: LayerKeep(attn=[0], mlp=list(range(48))) for i in range(4)}
    stats = collect_stats(model, SAMPLES, list(range(4)), progress=False)
    report = prune_model(model, keep, compensated_outputs(model, keep, stats, "lstsq"))
    assert report.uniform and not hasattr(model.config, "gqaprune_layers")


def test_unknown_method_refused():
    with pytest.raises(ValueError, match="compensation"):
        compensated_outputs(build_model("tiny-llama-gqa4"), KEEP, {}, "ols")


def test_chunked_statistics_give_the_same_refit():
    model = build_model("tiny-llama-gqa4")
    keep = {1: KEEP[1], 2: KEEP[2]}
    from gqaprune.pruning.compensation import compensate

    whole = compensate(model, keep, SAMPLES, "lstsq", progress=False)
    chunked = compensate(model, keep, SAMPLES, "lstsq", max_stats_bytes=1, progress=False)  # a chunk per layer
    assert whole.keys() == chunked.keys() == {(1, "attn"), (1, "mlp"), (2, "attn"), (2, "mlp")}
    for key in whole:
        assert torch.allclose(whole[key].weight, chunked[key].weight, atol=1e-6)
