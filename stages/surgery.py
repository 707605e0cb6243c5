"""DVC stage `surgery`: a thin wrapper over `gqaprune surgery`; `--help` lists its params."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("surgery")
