"""DVC stage `score`: a thin wrapper over `gqaprune.recipes.score`; `--help` lists its params."""

from gqaprune.recipes import score
from gqaprune.stage import stage_main

if __name__ == "__main__":
    stage_main("score", score.run)
