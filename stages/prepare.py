"""DVC stage `prepare`: a thin wrapper over `gqaprune.recipes.prepare`; `--help` lists its params."""

from gqaprune.recipes import prepare
from gqaprune.stage import stage_main

if __name__ == "__main__":
    stage_main("prepare", prepare.run)
