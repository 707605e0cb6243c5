"""The method: importance, layer similarity, the H-GSP plan and its allocation, surgery and compensation.

Lives here: ``importance`` (group scores), ``similarity`` (layer / block importance), ``plan`` (the
torch-free H-GSP planner), ``allocation`` (choosing the plan's priors on held-out windows),
``layerwise_eval`` (candidate plans measured against the dense model on shared layer-by-layer passes),
``surgery`` (slicing, saving the pruned checkpoint), ``compensation`` (least-squares / bias refits of
the output projections), ``sequential_refit`` (layer-by-layer refits), ``peer_methods`` (the public
methods as settings of this pipeline, for the quality benchmark).

May import: :mod:`gqaprune.models`, :mod:`gqaprune.data`, :mod:`gqaprune.config`,
:mod:`gqaprune.runtime`, :mod:`gqaprune.errors`.
"""
