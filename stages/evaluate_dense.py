"""DVC stage `evaluate_dense`: a thin wrapper over `gqaprune.recipes.evaluate_dense`; `--help` lists its params."""

from gqaprune.recipes import evaluate_dense
from gqaprune.stage import stage_main

if __name__ == "__main__":
    stage_main("evaluate_dense", evaluate_dense.run)
