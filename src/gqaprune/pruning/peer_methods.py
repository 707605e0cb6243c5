"""Named pruning strategies: an importance metric, an allocation (plan settings) and a compensation.

The peer methods are re-implemented here from their published descriptions as settings of the same
pipeline, so every strategy runs on the same calibration data, the same group definitions and the
same exact parameter budget:

* ``magnitude-sp``: L1 magnitude, the same ratio in every layer.
* ``wanda-sp``: |w| * input-activation norm, the same ratio in every layer.
* ``llm-pruner``: first-order Taylor, the same ratio per layer, first 4 and last 2 layers untouched.
* ``flap``: fluctuation (input variance x squared weight column norm), scores standardised per
  block, one global ranking, bias compensation.
* ``shortgpt``: remove whole layers by block influence (1 - cos) to the same budget.
* ``ours``: H-GSP with the project defaults (Taylor importance per parameter, global ranking,
  MLP widths aligned to 8, least-squares output compensation); ``ours-bias`` / ``ours-nocomp`` are
  the same plan with FLAP's bias or no compensation; the ``hgsp-*`` entries are the temperature /
  tau variants of SPEC.md with the same compensation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gqaprune.config.sections import PlanConfig


@dataclass(frozen=True)
class Strategy:
    """A complete pruning recipe: plan settings (ratio excluded) and output compensation."""

    plan: dict = field(default_factory=dict)
    compensation: str = "none"
    description: str = ""

    def plan_config(self, ratio: float, **overrides) -> PlanConfig:
        """The PlanConfig of this strategy at ``ratio``."""
        return PlanConfig(ratio=ratio, **{**self.plan, **overrides})


STRATEGIES: dict[str, Strategy] = {
    "ours": Strategy(dict(importance="taylor", temperature=0.0), "lstsq",
                     "Taylor per parameter, global, aligned, least-squares compensation (project default)"),
    "ours-bias": Strategy(dict(importance="taylor", temperature=0.0), "bias",
                          "the default plan with FLAP's bias compensation instead of least squares"),
    "ours-nocomp": Strategy(dict(importance="taylor", temperature=0.0), "none",
                            "the default plan without output compensation"),
    "hgsp-T1": Strategy(dict(importance="taylor", temperature=1.0), "lstsq",
                        "H-GSP T=1, tau = 25th percentile, priors normalised per kind"),
    "hgsp-T1-tau0": Strategy(dict(importance="taylor", temperature=1.0, tau=0.0), "lstsq",
                             "H-GSP T=1, all layers block-wise"),
    "hgsp-T1-tauinf": Strategy(dict(importance="taylor", temperature=1.0, tau=float("inf")), "lstsq",
                               "H-GSP T=1, all layers layer-wise"),
    "hgsp-T1-spec": Strategy(dict(importance="taylor", temperature=1.0, prior_norm="none"), "none",
                             "H-GSP exactly as SPEC.md words it (T=1, raw priors, no compensation)"),
    "magnitude-sp": Strategy(dict(importance="magnitude", strategy="uniform", temperature=0.0), "none",
                             "L1 magnitude, same ratio per layer"),
    "wanda-sp": Strategy(dict(importance="wanda", strategy="uniform", temperature=0.0), "none",
                         "Wanda-sp: |w| x input norm, same ratio per layer"),
    "llm-pruner": Strategy(dict(importance="taylor", strategy="uniform", temperature=0.0,
                                freeze_first_n_layers=4, freeze_last_n_layers=2), "none",
                           "LLM-Pruner: first-order Taylor, same ratio per layer, layers 4..L-3 only"),
    "flap": Strategy(dict(importance="fluctuation", normalize="standardize", temperature=0.0), "bias",
                     "FLAP: fluctuation metric, standardised per block, global, bias compensation"),
    "shortgpt": Strategy(dict(strategy="layer", temperature=1.0), "none",
                         "ShortGPT: remove the least influential whole layers"),
}
PEERS = ("magnitude-sp", "wanda-sp", "llm-pruner", "flap", "shortgpt")
#: ablations and T / tau variants of ours: the quality benchmark runs them at fewer ratios
VARIANTS = tuple(name for name in STRATEGIES if name != "ours" and name not in PEERS)


def get_strategy(name: str) -> Strategy:
    """A strategy by name; the error lists the known names."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}") from None


def prune_copy(dense, scores, similarity, counts, num_layers: int, strategy: Strategy, ratio: float,
               stats=None, ridge: float = 1e-2, plan_overrides: dict | None = None):
    """Plan ``strategy`` at ``ratio`` (with ``plan_overrides``, e.g. an allocation's) and return
    ``(pruned deep copy of dense, plan)``.

    ``stats`` are the compensation statistics of ``dense`` (:func:`gqaprune.pruning.compensation.collect_stats`),
    needed unless the strategy's compensation is 'none'.
    """
    import copy

    from gqaprune.pruning.compensation import compensated_outputs
    from gqaprune.pruning.plan import build_plan
    from gqaprune.pruning.surgery import prune_model

    plan = build_plan(scores, similarity, counts, num_layers, strategy.plan_config(ratio, **(plan_overrides or {})))
    model = copy.deepcopy(dense)
    if strategy.compensation != "none" and stats is None:
        raise ValueError(f"compensation {strategy.compensation!r} needs calibration statistics")
    replacements = compensated_outputs(model, plan.keep, stats or {}, strategy.compensation, ridge)
    prune_model(model, plan.keep, replacements)
    return model, plan
