"""gqaprune: GQA-aware structured pruning (H-GSP) for LLaMA-family LLMs."""

__version__ = "0.1.0"
