"""Deployment: GGUF for llama.cpp (with llama.cpp's own quantiser) and the model card.

Lives here: ``gguf`` (the writer: per-layer shapes as ``deci``), ``gguf_vocab`` (the tokenizer as a
GGUF vocabulary), ``llama_cpp`` (quantising and running a file), ``model_card``.

May import: :mod:`gqaprune.models`, :mod:`gqaprune.config`, :mod:`gqaprune.runtime`,
:mod:`gqaprune.errors`.
"""
