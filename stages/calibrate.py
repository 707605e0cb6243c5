"""DVC stage `calibrate`: a thin wrapper over `gqaprune calibrate` (see `python stages/calibrate.py --help`)."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("calibrate")
