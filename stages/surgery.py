"""DVC stage `surgery`: a thin wrapper over `gqaprune.recipes.surgery`; `--help` lists its params."""

from gqaprune.recipes import surgery
from gqaprune.stage import stage_main

if __name__ == "__main__":
    stage_main("surgery", surgery.run)
