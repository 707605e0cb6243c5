"""What a model can do: perplexity, task accuracy, generation health.

Lives here: ``perplexity`` (LLM-Pruner's protocol, spread windows, standard errors).

May import: :mod:`gqaprune.models`, :mod:`gqaprune.data`, :mod:`gqaprune.config`,
:mod:`gqaprune.runtime`, :mod:`gqaprune.errors`.
"""
