"""DVC stage `evaluate`: a thin wrapper over `gqaprune evaluate` (see `python stages/evaluate.py --help`)."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("evaluate")
