"""Allocation selection by a held-out criterion, held-out windows and spread evaluation windows."""

import math

import pytest
import torch

from gqaprune.config.sections import PlanConfig
from gqaprune.data.windows import calibration_samples, calibration_starts, corpus_token_ids, heldout_windows
from gqaprune.evaluation.perplexity import eval_windows, perplexity, spread_windows, window_nlls
from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import parameter_counts
from gqaprune.models.random_models import build_model
from gqaprune.pruning.allocation import (
    Candidate,
    dense_reference,
    heldout_criteria,
    oneshot_pruner,
    select_allocation,
    sequential_pruner,
)
from gqaprune.pruning.compensation import collect_stats
from gqaprune.pruning.importance import score_groups
from gqaprune.pruning.similarity import block_similarity
from helpers import small_tokenizer

CAL = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(1))
HELD = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def setup():
    dense = build_model("tiny-llama-gqa4")
    adapter = get_adapter(dense.config)
    g = adapter.geometry(dense.config)
    scores = score_groups(dense, CAL, metrics=("taylor", "magnitude"), progress=False)
    sim = block_similarity(dense, CAL, progress=False)
    stats = collect_stats(dense, CAL, list(range(g.num_layers)), progress=False)
    return dense, scores, sim, parameter_counts(dense, adapter, g), g.num_layers, stats


def test_criteria_are_zero_for_the_dense_model_and_nll_matches_the_evaluation(setup):
    dense = setup[0]
    ref = dense_reference(dense, HELD)
    v = heldout_criteria(dense, ref)
    assert v["kl"] == pytest.approx(0.0, abs=1e-6)
    assert v["nll"] == pytest.approx(float(window_nlls(dense, HELD).mean()), rel=1e-6)


@pytest.mark.parametrize("criterion", ["kl", "nll"])
def test_selection_picks_the_candidate_with_the_lowest_criterion(setup, criterion):
    dense, scores, sim, counts, n_layers, stats = setup
    cands = [Candidate("T0", dict(temperature=0.0)), Candidate("T1-tauinf", dict(temperature=1.0, tau=float("inf"))),
             Candidate("magnitude-uniform", dict(importance="magnitude", strategy="uniform", temperature=0.0))]
    sel = select_allocation(dense, scores, sim, counts, n_layers, PlanConfig(ratio=0.3, temperature=0.0), HELD,
                            oneshot_pruner(stats), cands, criterion=criterion, keep_model=True)
    table = sel.table.set_index("candidate")
    assert list(table.index) == ["T0", "T1-tauinf", "magnitude-uniform"]
    assert sel.choice.name == table[criterion].idxmin() and table.loc[sel.choice.name, "chosen"]
    assert sel.config.ratio == 0.3 and sel.config.importance == cands[[c.name for c in cands].index(
        sel.choice.name)].plan.get("importance", "taylor")
    # the returned model is the chosen one: re-measuring it gives the table's value
    again = heldout_criteria(sel.model, dense_reference(dense, HELD))[criterion]
    assert again == pytest.approx(table.loc[sel.choice.name, criterion], rel=1e-6)
    assert (table["kl"] > 0).all()


def test_candidate_needing_similarity_is_skipped_without_it(setup):
    dense, scores, _, counts, n_layers, stats = setup
    cands = [Candidate("T1", dict(temperature=1.0)), Candidate("T0", dict(temperature=0.0))]
    sel = select_allocation(dense, scores, None, counts, n_layers, PlanConfig(ratio=0.2, temperature=0.0), HELD,
                            oneshot_pruner(stats), cands)
    assert sel.choice.name == "T0"
    assert "similarity" in sel.table.set_index("candidate").loc["T1", "error"]


def test_sequential_pruner_runs_in_selection(setup):
    dense, scores, sim, counts, n_layers, _ = setup
    sel = select_allocation(dense, scores, sim, counts, n_layers, PlanConfig(ratio=0.2, temperature=0.0), HELD,
                            sequential_pruner(CAL), [Candidate("T0", dict(temperature=0.0))])
    assert math.isfinite(sel.table["kl"].iloc[0])


def test_spread_windows_cover_the_split_and_all_windows_is_the_full_grid():
    idx = spread_windows(100, 8)
    assert idx[0] == 0 and idx[-1] == 99 and len(set(idx.tolist())) == 8
    ids = torch.arange(1000)
    w, n_full = eval_windows(ids, 10, 80, spread=True)
    assert n_full == 100 and w.shape == (8, 10) and w[-1, 0] == 990
    first, _ = eval_windows(ids, 10, 80, spread=False)
    assert first[-1, 0] == 70
    full, _ = eval_windows(ids, 10, None, spread=True)
    assert full.shape == (100, 10)


def test_perplexity_reports_window_nlls_and_their_standard_error(data_dir):
    tok = small_tokenizer()
    model = build_model("tiny-llama-gqa3", vocab_size=len(tok))
    res = perplexity(model, tok, "wikitext2", seq_len=32, max_tokens=32 * 12, data_dir=data_dir,
                                spread=True)
    assert res.spread and res.n_windows == 12 and len(res.window_nll) == 12
    x = torch.tensor(res.window_nll, dtype=torch.float64)
    assert res.log_ppl == pytest.approx(float(x.mean()), rel=1e-9)
    assert res.log_ppl_se == pytest.approx(float(x.std() / math.sqrt(12)), rel=1e-9)
    first = perplexity(model, tok, "wikitext2", seq_len=32, max_tokens=32 * 12, data_dir=data_dir)
    assert first.window_nll[0] == pytest.approx(res.window_nll[0])  # both start at window 0
    assert first.window_nll[1:] != res.window_nll[1:]


def test_heldout_windows_share_no_token_with_the_calibration_samples(data_dir):
    tok = small_tokenizer()
    ids = corpus_token_ids(tok, "wikitext2", "validation", data_dir=data_dir)
    cal_starts = calibration_starts(ids.numel(), 40, 64, 0)
    held = heldout_windows(tok, "wikitext2", None, 30, 64, 40, 64, 0, data_dir=data_dir)
    assert held.shape == (30, 64)
    cal = calibration_samples(tok, "wikitext2", None, 40, 64, 0, data_dir=data_dir)
    assert torch.equal(cal[0], ids[cal_starts[0]:cal_starts[0] + 64])
    used = torch.zeros(ids.numel(), dtype=torch.bool)
    for s in cal_starts.tolist():
        used[s:s + 64] = True
    grid = ids[: ids.numel() // 64 * 64].view(-1, 64)
    rows = [int(torch.nonzero((grid == h).all(1))[0]) for h in held]
    assert len(set(rows)) == 30
    assert not any(used[r * 64:(r + 1) * 64].any() for r in rows)
    with pytest.raises(ValueError, match="evaluation split"):
        heldout_windows(tok, "wikitext2", "test", 4, 64, 0, 64, 0, data_dir=data_dir)


@pytest.mark.parametrize("method", ["lstsq", "bias", "none"])
def test_layerwise_candidates_equal_pruned_copies(setup, method):
    """The allocate stage's shared layer-by-layer passes give each candidate the KL and NLL of pruning a copy of
    the model with the same refits (float64 statistics there, float32 products here: close, not equal)."""
    dense, scores, sim, counts, n_layers, stats = setup
    cands = [Candidate("T0", dict(temperature=0.0)), Candidate("T1-tauinf", dict(temperature=1.0, tau=float("inf"))),
             Candidate("uniform", dict(strategy="uniform", temperature=0.0))]
    base = PlanConfig(ratio=0.3, temperature=0.0)
    fast = select_allocation(dense, scores, sim, counts, n_layers, base, HELD, None, cands, calibration=CAL,
                             method=method, halving=False).table.set_index("candidate")
    slow = select_allocation(dense, scores, sim, counts, n_layers, base, HELD,
                             oneshot_pruner(stats, method), cands).table.set_index("candidate")
    for name in fast.index:
        for key in ("kl", "nll"):
            assert fast.loc[name, key] == pytest.approx(slow.loc[name, key], rel=2e-4, abs=1e-6), (name, key)
    assert (fast["chosen"] == slow["chosen"]).all()
    assert set(fast["windows"]) == {HELD.shape[0]}


def test_halving_drops_only_clearly_worse_candidates(setup):
    """A candidate far worse than the best on the first third of the windows is not measured further; candidates
    that are not clearly worse are measured on every window; the choice is the one made without halving."""
    dense, scores, sim, counts, n_layers, _ = setup
    held = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(3))
    cands = [Candidate("T0", dict(temperature=0.0)), Candidate("T0-again", dict(temperature=0.0)),
             Candidate("magnitude-uniform", dict(importance="magnitude", strategy="uniform", temperature=0.0))]
    base = PlanConfig(ratio=0.5, temperature=0.0)
    full = select_allocation(dense, scores, sim, counts, n_layers, base, held, None, cands, calibration=CAL,
                             halving=False).table.set_index("candidate")
    halved = select_allocation(dense, scores, sim, counts, n_layers, base, held, None, cands, calibration=CAL,
                               window_groups=["a"] * 6 + ["b"] * 6).table.set_index("candidate")
    chosen = halved.index[halved["chosen"]][0]
    assert chosen == full.index[full["chosen"]][0] == "T0"
    for name in ("T0", "T0-again"):  # equal: neither is clearly worse, both measured everywhere
        assert halved.loc[name, "windows"] == 12 and not halved.loc[name, "dropped_early"]
        assert halved.loc[name, "kl"] == pytest.approx(full.loc[name, "kl"], rel=1e-6)
    assert halved.loc["magnitude-uniform", "dropped_early"] and halved.loc["magnitude-uniform", "windows"] == 4
    assert halved.loc["magnitude-uniform", "kl"] > halved.loc["T0", "kl"]
    assert {"a_kl", "b_kl"} <= set(halved.columns)
