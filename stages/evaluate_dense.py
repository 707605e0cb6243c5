"""DVC stage `evaluate_dense`: runs `gqaprune.pipeline.recipes.evaluate_dense` through the stage runner (`--help`)."""

from gqaprune.pipeline.runner import stage_main

if __name__ == "__main__":
    stage_main("evaluate_dense")
