"""DVC stage `finetune`: runs `gqaprune.pipeline.recipes.finetune` through the stage runner (`--help`)."""

from gqaprune.pipeline.runner import stage_main

if __name__ == "__main__":
    stage_main("finetune")
