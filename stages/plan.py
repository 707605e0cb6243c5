"""DVC stage `plan`: a thin wrapper over `gqaprune plan`; `--help` lists its params."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("plan")
