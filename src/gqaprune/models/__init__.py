"""Models: family adapters, the prunable groups, loading, fingerprints and checkpoints.

Lives here: ``adapters`` (one adapter per family, chosen by ``config.model_type``: geometry, module
access, biases, tied embeddings, rotary reset, GGUF architecture), ``units`` (torch-free group kinds,
keep lists, counts), ``groups`` (the group table of a concrete model), ``hf_code`` (the group layout
and the modeling code saved with pruned checkpoints; file names kept for ``auto_map``), ``sources``
(embedded / local / hub sources, cheap checks, references), ``loading`` (the one model loader),
``fingerprint``, ``checkpoint`` (the streamed safetensors writer), ``modules`` (activation
checkpointing, the decoder / head split, non-finite checks), ``random_models`` (tiny random models for
tests and benchmarks).

May import: :mod:`gqaprune.config`, :mod:`gqaprune.runtime`, :mod:`gqaprune.errors`.
"""
