"""params.yaml validation: the project's file loads; bad keys and values are refused by name."""

from pathlib import Path

import pytest

from gqaprune.config.loading import load_params
from gqaprune.config.rules import ParamsError

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_load():
    params = load_params(ROOT / "params.yaml")
    assert params.prepare.model == "embedded"
    assert params.plan.importance in params.score.metrics
    assert params.surgery.compensation == "lstsq"


@pytest.mark.parametrize("override, message", [
    ("plan.ratioo=0.3", "unknown key plan.ratioo"),
    ("plann.ratio=0.3", "unknown key plann"),
    ("plan.ratio=abc", "plan.ratio must be a number"),
    ("plan.ratio=1.5", "plan.ratio must be in"),
    ("score.metrics=taylor", "score.metrics must be a list"),
    ("score.metrics=[taylor, fisher]", "plan.importance|metrics"),
    ("calibrate.n_samples=0", "calibrate.n_samples must be >= 1"),
    ("calibrate.n_samples=2.5", "calibrate.n_samples must be an integer"),
    ("finetune.r=-1", "finetune.r"),
    ("surgery.compensation=ols", "surgery.compensation"),
    ("evaluate.max_tokens=10", "evaluate.max_tokens"),
    ("plan.importance=wanda", None),  # accepted: wanda is scored by default
])
def test_bad_values_named(override, message):
    if message is None:
        assert load_params(ROOT / "params.yaml", [override]).plan.importance == "wanda"
        return
    with pytest.raises(ParamsError, match=message):
        load_params(ROOT / "params.yaml", [override])


def test_overrides_parse_yaml_values():
    params = load_params(ROOT / "params.yaml", ["plan.tau=.inf", "evaluate.max_tokens=null", "finetune.lr=1e-4"])
    assert params.plan.tau == float("inf") and params.evaluate.max_tokens is None
    assert params.finetune.lr == pytest.approx(1e-4)


def test_missing_file_named(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")


def test_params_yaml_holds_every_key_with_the_code_default():
    """One source of truth: every key of every section is in params.yaml with the value the code (and so
    ``--help``) gives as its default, and params.yaml holds no key the code does not know."""
    import dataclasses

    import yaml

    from gqaprune.config.sections import SECTIONS

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(raw) == {cls.section for cls in SECTIONS}
    parsed = load_params(ROOT / "params.yaml")
    for cls in SECTIONS:
        fields = [f for f in dataclasses.fields(cls) if f.init]
        assert set(raw[cls.section]) == {f.name for f in fields}, cls.section
        section = getattr(parsed, cls.section)
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert getattr(section, f.name) == default, f"{cls.section}.{f.name}"


def test_help_shows_the_params_yaml_values():
    from gqaprune.pipeline.runner import help_text
    from gqaprune.pipeline.stages import STAGES

    text = help_text(STAGES["calibrate"])
    assert "n_samples (int, default 64)" in text
    assert "temperature (float, default 0.0)" in help_text(STAGES["plan"])
