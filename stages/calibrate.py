"""DVC stage `calibrate`: a thin wrapper over `gqaprune calibrate`; `--help` lists its params."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("calibrate")
