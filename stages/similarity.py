"""DVC stage `similarity`: a thin wrapper over `gqaprune similarity` (see `python stages/similarity.py --help`)."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("similarity")
