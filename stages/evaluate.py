"""DVC stage `evaluate`: a thin wrapper over `gqaprune evaluate`; `--help` lists its params."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("evaluate")
