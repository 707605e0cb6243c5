"""DVC stage `similarity`: a thin wrapper over `gqaprune.recipes.similarity`; `--help` lists its params."""

from gqaprune.recipes import similarity
from gqaprune.stage import stage_main

if __name__ == "__main__":
    stage_main("similarity", similarity.run)
