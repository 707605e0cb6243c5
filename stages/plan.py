"""DVC stage `plan`: a thin wrapper over `gqaprune plan` (see `python stages/plan.py --help`)."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("plan")
