"""H-GSP plan: budget exactness, determinism, tau / epsilon / temperature semantics, refusals."""

import math

import numpy as np
import pytest
import torch

from gqaprune.config.rules import PlanError
from gqaprune.config.sections import PlanConfig
from gqaprune.models.adapters import get_adapter
from gqaprune.models.fingerprint import fingerprint
from gqaprune.models.groups import parameter_counts
from gqaprune.models.random_models import build_model
from gqaprune.pipeline.artifacts import ArtifactMismatchError, check_fingerprint, read_table, write_table
from gqaprune.pruning.importance import score_groups
from gqaprune.pruning.plan import build_plan
from gqaprune.pruning.similarity import block_similarity
from gqaprune.pruning.surgery import prune_model

SAMPLES = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def scored():
    model = build_model("tiny-llama-gqa4", num_hidden_layers=6)
    adapter = get_adapter(model.config)
    geo = adapter.geometry(model.config)
    counts = parameter_counts(model, adapter, geo)
    scores = score_groups(model, SAMPLES, progress=False)
    sim = block_similarity(model, SAMPLES, progress=False)
    return model, geo, counts, scores, sim


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.5])
@pytest.mark.parametrize("align", [1, 8])
def test_budget_lands_within_one_unit(scored, ratio, align):
    model, geo, counts, scores, sim = scored
    plan = build_plan(scores, sim, counts, geo.num_layers, PlanConfig(ratio=ratio, mlp_align=align, temperature=1.0))
    a = plan.analysis
    gap = a["target_params_removed"] - a["params_removed"]
    assert 0 <= gap < align * geo.mlp_channel_cost
    assert a["target_params_removed"] == round(ratio * counts.total)
    assert (plan.layers["mlp_kept"] % align == 0).all()
    # the plan's numbers are the model's after surgery
    import copy
    pruned = copy.deepcopy(model)
    prune_model(pruned, plan.keep)
    after = parameter_counts(pruned, get_adapter(pruned.config), geo)
    assert after.total == a["params_after"]


def test_same_inputs_give_byte_identical_plan(scored):
    _, geo, counts, scores, sim = scored
    config = PlanConfig(ratio=0.3, epsilon=0.3, temperature=1.0)
    one = build_plan(scores, sim, counts, geo.num_layers, config)
    two = build_plan(scores.copy(), sim.copy(), counts, geo.num_layers, config)
    assert one.table.to_csv().encode() == two.table.to_csv().encode()
    assert one.analysis == two.analysis


def test_temperature_zero_needs_no_similarity_and_ranks_by_importance(scored):
    _, geo, counts, scores, _ = scored
    plan = build_plan(scores, None, counts, geo.num_layers, PlanConfig(ratio=0.2, temperature=0, mlp_align=1))
    t = plan.table
    assert (t["score"] == t["importance"] / t["cost"]).all()
    # every pruned MLP channel scores no higher than every kept MLP channel of the same cost
    mlp = t[t["kind"] == "mlp"]
    assert mlp[mlp["pruned"]]["score"].max() <= mlp[~mlp["pruned"]]["score"].min()
    with pytest.raises(PlanError, match="similarity"):
        build_plan(scores, None, counts, geo.num_layers, PlanConfig(ratio=0.2, temperature=1))


def test_tau_gates_layer_and_block_priors(scored):
    _, geo, counts, scores, sim = scored
    all_layer = build_plan(scores, sim, counts, geo.num_layers, PlanConfig(tau=math.inf, temperature=1.0))
    assert set(all_layer.layers["mode"]) == {"layer"}
    t = all_layer.table
    assert np.allclose(t["prior"], sim["layer_importance"].to_numpy()[t["layer"]])
    all_block = build_plan(scores, sim, counts, geo.num_layers, PlanConfig(tau=0.0, temperature=1.0))
    assert set(all_block.layers["mode"]) == {"block"}
    literal = build_plan(scores, sim, counts, geo.num_layers, PlanConfig(prior_norm="none", temperature=2.0))
    assert literal.analysis["tau_used"] == pytest.approx(np.percentile(sim["layer_importance"], 25))
    t = literal.table
    assert np.allclose(t["score"], t["importance"] / t["cost"] * np.log1p(t["prior"]) ** 2)
    # "kind": ln(1 + prior) is divided by its mean over the layers, separately for attention and MLP
    t = build_plan(scores, sim, counts, geo.num_layers, PlanConfig(temperature=1.0)).table
    multiplier = t["score"] / (t["importance"] / t["cost"])
    for kind in ("attn", "mlp"):
        per_layer = multiplier[t["kind"] == kind].groupby(t["layer"]).first()
        assert per_layer.mean() == pytest.approx(1.0)
        raw = np.log1p(t.loc[t["kind"] == kind, "prior"]).groupby(t["layer"]).first()
        assert np.allclose(per_layer / per_layer.iloc[0], raw / raw.iloc[0])


def test_uniform_strategy_prunes_every_layer_alike(scored):
    _, geo, counts, scores, sim = scored
    plan = build_plan(scores, sim, counts, geo.num_layers,
                      PlanConfig(ratio=0.3, strategy="uniform", temperature=0, freeze_first_n_layers=1))
    layers = plan.layers[plan.layers["layer"] > 0]
    assert plan.layers.loc[0, "mlp_kept"] == geo.intermediate_size
    # equal fraction per layer, up to the top-up of a few units
    assert layers["mlp_kept"].max() - layers["mlp_kept"].min() <= 3 * 8
    gap = plan.analysis["target_params_removed"] - plan.analysis["params_removed"]
    assert 0 <= gap < 8 * geo.mlp_channel_cost


def test_standardize_is_per_block(scored):
    _, geo, counts, scores, sim = scored
    t = build_plan(scores, None, counts, geo.num_layers, PlanConfig(temperature=0, normalize="standardize")).table
    stats = t.groupby(["layer", "kind"], observed=True)["score"].agg(["mean", "std"])
    assert np.allclose(stats["mean"], 0.0, atol=1e-9)
    assert np.allclose(stats.loc[stats.index.get_level_values("kind") == "mlp", "std"], 1.0)


def test_epsilon_collapses_thin_blocks_and_keeps_budget(scored):
    _, geo, counts, scores, sim = scored
    plan = build_plan(scores, sim, counts, geo.num_layers,
                      PlanConfig(ratio=0.4, epsilon=0.6, mlp_align=1, temperature=1.0))
    layers = plan.layers
    for kind, total in (("attn", "attn_groups"), ("mlp", "mlp_channels")):
        kept = layers[f"{kind}_kept"]
        assert not ((kept > 0) & (kept < 0.6 * layers[total])).any()
    gap = plan.analysis["target_params_removed"] - plan.analysis["params_removed"]
    assert 0 <= gap < geo.mlp_channel_cost or plan.analysis["removed_layers"]


def test_frozen_layers_untouched_and_layer_strategy(scored):
    _, geo, counts, scores, sim = scored
    plan = build_plan(scores, sim, counts, geo.num_layers,
                      PlanConfig(ratio=0.3, freeze_first_n_layers=2, freeze_last_n_layers=1, temperature=1.0))
    assert not plan.table[plan.table["layer"].isin([0, 1, 5])]["pruned"].any()
    layered = build_plan(scores, sim, counts, geo.num_layers, PlanConfig(ratio=0.3, strategy="layer", temperature=1.0))
    removed = layered.analysis["removed_layers"]
    assert len(removed) == 2  # 2 of 6 layers is the closest to 30% of all parameters here
    least = sim.sort_values("layer_importance")["layer"].tolist()[:2]
    assert sorted(removed) == sorted(least)


@pytest.mark.parametrize("strategy", ["hgsp", "uniform"])
def test_prune_attention_false_keeps_every_attention_group(scored, strategy):
    _, geo, counts, scores, sim = scored
    scores = scores.copy()
    scores.loc[scores["kind"] == "attn", "taylor"] = 0.0  # attention the least important: the first to go
    both = build_plan(scores, sim, counts, geo.num_layers, PlanConfig(ratio=0.3, strategy=strategy, temperature=1.0))
    assert both.table[both.table["kind"] == "attn"]["pruned"].any()
    mlp_only = build_plan(scores, sim, counts, geo.num_layers,
                          PlanConfig(ratio=0.3, strategy=strategy, temperature=1.0, prune_attention=False))
    assert not mlp_only.table[mlp_only.table["kind"] == "attn"]["pruned"].any()
    a = mlp_only.analysis
    assert 0 <= a["target_params_removed"] - a["params_removed"] < 8 * geo.mlp_channel_cost
    assert list(mlp_only.table.columns) == list(both.table.columns)  # no helper column leaks into the artifact
    with pytest.raises(PlanError, match="prune_attention"):  # MLP channels alone cannot give 90 %
        build_plan(scores, sim, counts, geo.num_layers, PlanConfig(ratio=0.9, prune_attention=False))


@pytest.mark.parametrize("kwargs, message", [
    (dict(ratio=1.0), "plan.ratio"),
    (dict(ratio=0.0), "plan.ratio"),
    (dict(ratio=0.6, freeze_first_n_layers=4), "only"),
    (dict(ratio=0.2, freeze_first_n_layers=3, freeze_last_n_layers=3), "frozen"),
    (dict(importance="fisher"), "plan.importance"),
    (dict(temperature=-1.0), "plan.temperature"),
    (dict(epsilon=1.5), "plan.epsilon"),
])
def test_impossible_settings_refused(scored, kwargs, message):
    _, geo, counts, scores, sim = scored
    with pytest.raises(PlanError, match=message):
        build_plan(scores, sim, counts, geo.num_layers, PlanConfig(**{"temperature": 1.0, **kwargs}))


def test_nan_scores_refused(scored):
    _, geo, counts, scores, sim = scored
    bad = scores.copy()
    bad.loc[3, "taylor"] = np.nan
    with pytest.raises(PlanError, match="NaN"):
        build_plan(bad, sim, counts, geo.num_layers, PlanConfig(temperature=1.0))


def test_scores_of_another_model_refused(scored, tmp_path):
    model, _, _, scores, _ = scored
    write_table(tmp_path / "scores.parquet", scores, {"fingerprint": fingerprint(model)})
    table, meta = read_table(tmp_path / "scores.parquet")
    check_fingerprint(meta, fingerprint(model), "scores")  # same model: accepted
    other = build_model("tiny-llama-gqa4", num_hidden_layers=6, seed=7)
    with pytest.raises(ArtifactMismatchError, match="scores"):
        check_fingerprint(meta, fingerprint(other), "scores")
    assert table["taylor"].tolist() == scores["taylor"].tolist()
