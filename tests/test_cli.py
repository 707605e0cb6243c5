"""The command line: stage commands with -S overrides through typer, `gqaprune ppl`, one-line errors."""

import json

from typer.testing import CliRunner

from gqaprune.cli import app
from gqaprune.pipeline.stages import STAGES

runner = CliRunner()


def test_help_lists_every_stage_and_ppl():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in [*STAGES, "ppl"]:
        assert name.replace("_", "-") in result.output


def test_stage_help_names_its_params():
    result = runner.invoke(app, ["plan", "--help"])
    assert result.exit_code == 0 and "ratio" in result.output and "temperature" in result.output


def test_stage_with_overrides(project):
    result = runner.invoke(app, ["plan", "-S", "plan.ratio=0.3"])  # the allocation was chosen for 0.2
    assert result.exit_code == 1 and "re-run allocate" in result.stderr
    result = runner.invoke(app, ["allocate", "-S", "plan.ratio=0.3", "-S", "allocate.mode=fixed"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["plan", "-S", "plan.ratio=0.3", "--set", "plan.temperature=0", "-S",
                                 "allocate.mode=fixed"])
    assert result.exit_code == 0, result.output
    analysis = json.loads((project / "artifacts/plan/pruning_analysis.json").read_text())
    assert analysis["config"]["ratio"] == 0.3 and analysis["config"]["temperature"] == 0.0
    assert abs(analysis["ratio_total"] - 0.3) < 0.02


def test_stage_bad_override_is_one_line(project):
    result = runner.invoke(app, ["plan", "-S", "plan.ratioo=0.3"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: unknown key plan.ratioo")


def test_ppl_prints_json(project, data_dir):
    model = str(project.parent / "tiny-model")
    result = runner.invoke(app, ["ppl", model, "-d", "wikitext2", "-d", "ptb", "--max-tokens", "128",
                                 "--seq-len", "64", "--data-dir", str(data_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"wikitext2", "ptb"}
    assert out["wikitext2"]["windows"] == 2 and out["wikitext2"]["capped"] and out["ptb"]["ppl"] > 1


def test_ppl_missing_model_is_one_line(project):
    result = runner.invoke(app, ["ppl", "./missing-model", "--device", "cpu"])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: model: model folder") and "Traceback" not in result.stderr


def test_export_gguf_command(tmp_path):
    """`gqaprune export-gguf` writes a GGUF llama.cpp reads back, plus a Q8_0 copy from llama.cpp's quantiser."""
    from gqaprune.models.random_models import build_model
    from gqaprune.models.units import LayerKeep
    from gqaprune.pruning.surgery import prune_model, save_pruned
    from helpers import small_tokenizer

    tokenizer = small_tokenizer()
    model = build_model("tiny-llama-gqa4", vocab_size=len(tokenizer))
    prune_model(model, {0: LayerKeep(attn=[1], mlp=list(range(0, 96, 2)))})
    save_pruned(model, tokenizer, tmp_path / "pruned")
    result = runner.invoke(app, ["export-gguf", str(tmp_path / "pruned"), str(tmp_path / "m.gguf"), "-q", "Q8_0"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["arch"] == "deci" and set(map(lambda p: p.split("/")[-1], report["files"])) == {"m.gguf",
                                                                                                   "m-Q8_0.gguf"}
    assert (tmp_path / "m-Q8_0.gguf").stat().st_size < (tmp_path / "m.gguf").stat().st_size
    bad = runner.invoke(app, ["export-gguf", str(tmp_path / "nowhere"), str(tmp_path / "x.gguf")])
    assert bad.exit_code == 1 and bad.stderr.startswith("error:")
