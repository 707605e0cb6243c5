"""Named strategies (the peers and our variants), on which the whole quality comparison rests."""

import copy

import pytest
import torch

from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import parameter_counts
from gqaprune.models.random_models import build_model
from gqaprune.pruning.compensation import collect_stats
from gqaprune.pruning.importance import score_groups
from gqaprune.pruning.peer_methods import PEERS, STRATEGIES, VARIANTS, get_strategy, prune_copy
from gqaprune.pruning.similarity import block_similarity

SAMPLES = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def inputs():
    dense = build_model("tiny-llama-gqa4", num_hidden_layers=12, intermediate_size=128)
    adapter = get_adapter(dense.config)
    geo = adapter.geometry(dense.config)
    counts = parameter_counts(dense, adapter, geo)
    scores = score_groups(dense, SAMPLES, progress=False)
    sim = block_similarity(dense, SAMPLES, progress=False)
    stats = collect_stats(dense, SAMPLES, list(range(geo.num_layers)), progress=False)
    return dense, geo, counts, scores, sim, stats


def test_registry():
    assert set(PEERS) <= set(STRATEGIES) and "ours" in STRATEGIES
    assert "ours" not in VARIANTS and not set(PEERS) & set(VARIANTS)
    assert set(VARIANTS) | set(PEERS) | {"ours"} == set(STRATEGIES)
    with pytest.raises(ValueError, match="known: ours"):
        get_strategy("nope")
    for strategy in STRATEGIES.values():
        strategy.plan_config(0.3).validate()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_prunes_to_the_budget(inputs, name):
    dense, geo, counts, scores, sim, stats = inputs
    reference = copy.deepcopy(dense.state_dict())
    strategy = STRATEGIES[name]
    pruned, plan = prune_copy(dense, scores, sim, counts, geo.num_layers, strategy, 0.3, stats=stats)
    after = parameter_counts(pruned, get_adapter(pruned.config), geo).total
    extra = after - plan.analysis["params_after"]  # bias compensation adds output biases, nothing else does
    assert extra == 0 if strategy.compensation != "bias" else 0 <= extra <= 2 * geo.num_layers * geo.hidden_size
    layer_share = (counts.total - counts.embeddings) / geo.num_layers / counts.total
    # group-level strategies land within one unit; whole-layer removal within half a layer
    assert abs(plan.analysis["ratio_total"] - 0.3) <= (layer_share / 2 if name == "shortgpt" else 0.01)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in reference.items())  # the dense model is untouched
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=SAMPLES[:2]).logits).all()


def test_peer_allocations(inputs):
    dense, geo, counts, scores, sim, stats = inputs
    _, plan = prune_copy(dense, scores, sim, counts, geo.num_layers, STRATEGIES["llm-pruner"], 0.2)
    layers = plan.layers
    untouched = layers[(layers["layer"] < 4) | (layers["layer"] >= geo.num_layers - 2)]
    assert (untouched["params_removed"] == 0).all()  # first 4 and last 2 layers frozen
    touched = layers.drop(untouched.index)
    assert touched["mlp_kept"].max() - touched["mlp_kept"].min() <= 8  # the same ratio per layer (+ top-up)
    _, plan = prune_copy(dense, scores, sim, counts, geo.num_layers, STRATEGIES["shortgpt"], 0.3)
    removed = set(plan.analysis["removed_layers"])
    assert removed and all(plan.layers.loc[plan.layers["layer"].isin(removed), "layer_removed"])
    lowest = sim.sort_values("layer_importance")["layer"].head(len(removed))
    assert removed == set(lowest)  # the least influential layers go
    with pytest.raises(ValueError, match="statistics"):
        prune_copy(dense, scores, sim, counts, geo.num_layers, STRATEGIES["ours"], 0.2, stats=None)
