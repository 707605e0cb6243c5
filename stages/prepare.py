"""DVC stage `prepare`: a thin wrapper over `gqaprune prepare`; `--help` lists its params."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("prepare")
