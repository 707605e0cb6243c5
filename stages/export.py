"""DVC stage `export`: a thin wrapper over `gqaprune.recipes.export`; `--help` lists its params."""

from gqaprune.recipes import export
from gqaprune.stage import stage_main

if __name__ == "__main__":
    stage_main("export", export.run)
