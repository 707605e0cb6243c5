"""DVC stage `surgery`: a thin wrapper over `gqaprune surgery` (see `python stages/surgery.py --help`)."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("surgery")
