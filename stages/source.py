"""DVC stage `source`: runs `gqaprune.pipeline.recipes.source` through the stage runner (`--help`)."""

from gqaprune.pipeline.runner import stage_main

if __name__ == "__main__":
    stage_main("source")
