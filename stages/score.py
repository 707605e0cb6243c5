"""DVC stage `score`: a thin wrapper over `gqaprune score`; `--help` lists its params."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("score")
