"""DVC stage `finetune`: a thin wrapper over `gqaprune finetune`; `--help` lists its params."""

from gqaprune.cli import stage_main

if __name__ == "__main__":
    stage_main("finetune")
