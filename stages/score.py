"""DVC stage `score`: a thin wrapper over `gqaprune score` (see `python stages/score.py --help`)."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("score")
