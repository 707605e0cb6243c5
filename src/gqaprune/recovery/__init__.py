"""Recovery of a pruned model: LoRA on instruction data (peft) and distillation from the dense model.

May import: :mod:`gqaprune.models`, :mod:`gqaprune.data`, :mod:`gqaprune.config`,
:mod:`gqaprune.runtime`, :mod:`gqaprune.errors`.
"""
