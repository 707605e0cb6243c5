"""DVC stage `allocate`: a thin wrapper over `gqaprune.recipes.allocate`; `--help` lists its params."""

from gqaprune.recipes import allocate
from gqaprune.stage import stage_main

if __name__ == "__main__":
    stage_main("allocate", allocate.run)
