"""DVC stage `evaluate`: a thin wrapper over `gqaprune.recipes.evaluate`; `--help` lists its params."""

from gqaprune.recipes import evaluate
from gqaprune.stage import stage_main

if __name__ == "__main__":
    stage_main("evaluate", evaluate.run)
