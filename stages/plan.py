"""DVC stage `plan`: a thin wrapper over `gqaprune.recipes.plan`; `--help` lists its params."""

from gqaprune.recipes import plan
from gqaprune.stage import stage_main

if __name__ == "__main__":
    stage_main("plan", plan.run)
