"""What a model can do: perplexity, task accuracy, code that runs, instruction answers, generation health.

Lives here: ``suite`` (every measure of the ``evaluate`` section on one model, and its retention next to
the dense model's), ``perplexity`` (LLM-Pruner's protocol, spread windows, standard errors), ``tasks`` and
``task_files`` (lm-eval-harness on the model in memory, local task folders, the offline check),
``humaneval`` (greedy pass@1) and ``sandbox`` (model-written code in its own process, limits, no
network), ``instructions`` (answer NLL of held-out records), ``generate`` (the one batched greedy
generator) and ``generation`` (loops, distinct-n, agreement with the dense model, the side-by-side
document).

May import: :mod:`gqaprune.models`, :mod:`gqaprune.data`, :mod:`gqaprune.config`,
:mod:`gqaprune.runtime`, :mod:`gqaprune.errors`.
"""
