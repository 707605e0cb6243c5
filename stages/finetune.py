"""DVC stage `finetune`: a thin wrapper over `gqaprune.recipes.finetune`; `--help` lists its params."""

from gqaprune.recipes import finetune
from gqaprune.stage import stage_main

if __name__ == "__main__":
    stage_main("finetune", finetune.run)
