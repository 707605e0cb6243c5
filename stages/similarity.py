"""DVC stage `similarity`: a thin wrapper over `gqaprune similarity`; `--help` lists its params."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("similarity")
