"""DVC stage `prepare`: a thin wrapper over `gqaprune prepare` (see `python stages/prepare.py --help`)."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("prepare")
