"""The fixed prompt set of the generation-health check (:mod:`gqaprune.evaluation.generation`).

Written for this project (no benchmark text): :data:`INSTRUCTION_PROMPTS` are free-form requests a
chat model answers in a few lines (generated through the chat template, ended by EOS);
:data:`CODE_PROMPTS` are raw Python openings the model continues (no template). Short, everyday, with
known good answers, so a reader can judge a pruned model's output at a glance.

:data:`PROMPT_SET_VERSION` changes whenever a prompt is added, removed or edited: metrics of different
versions are not comparable (a dense reference of another version must be regenerated).
"""

from __future__ import annotations

__all__ = ["CODE_PROMPTS", "INSTRUCTION_PROMPTS", "PROMPT_SET_VERSION"]

PROMPT_SET_VERSION = 1

INSTRUCTION_PROMPTS: tuple[str, ...] = (
    "Name three fruits.",
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about autumn.",
    "List the days of the week.",
    "Give three tips for staying healthy.",
    "What is the capital of France? Answer in one sentence.",
    "Translate 'good morning' into Spanish and French.",
    "Summarise the story of Little Red Riding Hood in three sentences.",
    "Write a short email asking a colleague to move our meeting to Friday.",
    "What is 12 multiplied by 7? Show your working.",
    "Describe a cat to someone who has never seen one.",
    "Suggest a name for a small bakery and explain your choice.",
)

CODE_PROMPTS: tuple[str, ...] = (
    "def fibonacci(n):\n",
    'def is_prime(n):\n    """Return True if n is prime."""\n',
    'def reverse_string(s: str) -> str:\n    """Return s reversed."""\n',
    'def count_vowels(text: str) -> int:\n    """Count the vowels (a, e, i, o, u) in text, ignoring case."""\n',
    "def factorial(n):\n    # n! computed iteratively\n",
    'class Stack:\n    """A last-in, first-out stack backed by a list."""\n\n    def __init__(self):\n',
    "import math\n\n\ndef circle_area(radius: float) -> float:\n",
    'def merge_sorted(a: list, b: list) -> list:\n    """Merge two sorted lists into one sorted list."""\n',
)
