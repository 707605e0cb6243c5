"""DVC stage `calibrate`: a thin wrapper over `gqaprune.recipes.calibrate`; `--help` lists its params."""

from gqaprune.recipes import calibrate
from gqaprune.stage import stage_main

if __name__ == "__main__":
    stage_main("calibrate", calibrate.run)
