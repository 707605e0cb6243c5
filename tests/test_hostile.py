"""Hostile inputs (issue 20, "Nothing lost, nothing stale"): one test per class of finding, tiny models, CPU.

Each test failed on the code before the fix (commit 1128f19): the stage accepted the input, lost data, wrote
invalid JSON or gave a raw error. New names are imported inside the tests, so each one fails on its own there.
The DVC side of recovery (a stage killed under ``dvc repro`` and restored by ``dvc checkout``) is tested in
``tests/test_pipeline.py``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import error_line, run, tree_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]


def _params(root: Path) -> dict:
    return yaml.safe_load((root / "params.yaml").read_text())


def _mirror(root: Path) -> Path:
    """A private copy of the corpora folder the project reads."""
    mirror = root.parent / "mirror"
    shutil.copytree(_params(root)["data"]["data_dir"], mirror)
    return mirror


def _model_copy(root: Path, name: str) -> Path:
    folder = root.parent / name
    shutil.copytree(root.parent / "tiny-model", folder)
    return folder


# --- LOSS: a source inside the pipeline's own outputs is refused before anything is touched ------------------
@pytest.mark.parametrize("inside", ["artifacts/model", "artifacts/pruned"])
def test_source_inside_the_outputs_is_refused(project, capsys, inside):
    assert run("prepare", capsys, "prepare.copy_local=true")[0] == 0  # artifacts/model holds the weights
    if inside == "artifacts/pruned":  # a pruned result the user wants to prune again
        shutil.copytree(project.parent / "tiny-model", project / inside)
    before = {p: tree_bytes(project / p) for p in ("artifacts/model", "artifacts/model.json", inside)}
    code, err = run("prepare", capsys, f"prepare.model={inside}")
    line = error_line(err)
    assert code == 1 and inside in line and "cp -rL" in line and "-S prepare.model=" in line, line
    assert {p: tree_bytes(project / p) for p in before} == before  # nothing deleted, nothing replaced
    assert (project / "artifacts/model/model.safetensors").is_file()


# --- WRONG RESULT: after a direct re-run of plan and surgery, the old recovery is not reported as the new --------
def test_stale_recovery_and_mixed_export_are_refused(evaluated, capsys):
    results = json.loads((evaluated / "artifacts/evaluation/results.json").read_text())
    assert set(results["ppl"]) == {"dense", "pruned", "finetuned"}
    fixed = ["allocate.mode=fixed", "plan.ratio=0.3", "plan.temperature=0"]
    assert run("allocate", capsys, *fixed)[0] == 0
    assert run("plan", capsys, *fixed)[0] == 0
    assert run("surgery", capsys, *fixed)[0] == 0  # a new pruned model; finetune and evaluate are of the old one
    code, err = run("evaluate", capsys, *fixed)
    line = error_line(err)
    assert code == 1 and "artifacts/finetune" in line and "re-run finetune" in line, line
    before = tree_bytes(evaluated / "artifacts/evaluation")
    code, err = run("export", capsys, *fixed, "export.quantize=[]")
    line = error_line(err)
    assert code == 1 and "re-run evaluate" in line, line  # the card would mix the old results with the new model
    assert not (evaluated / "artifacts/export").exists() and tree_bytes(evaluated / "artifacts/evaluation") == before


# --- DVC sees the source model: a content digest, not size and mtime ------------------------------------------
def test_a_source_edit_that_keeps_size_and_mtime_is_seen(project, capsys):
    source = _model_copy(project, "editable-model")
    assert run("prepare", capsys, f"prepare.model={source}")[0] == 0  # artifacts/model references it
    assert run("source", capsys, f"prepare.model={source}")[0] == 0
    first = (project / "artifacts/source.json").read_bytes()
    assert run("source", capsys, f"prepare.model={source}")[0] == 0
    assert (project / "artifacts/source.json").read_bytes() == first  # unchanged source: the same bytes
    weights = source / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: same size
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    assert run("source", capsys, f"prepare.model={source}")[0] == 0
    assert (project / "artifacts/source.json").read_bytes() != first  # so `dvc repro` re-runs prepare
    code, err = run("calibrate", capsys, f"prepare.model={source}")  # loads the tokenizer only: fine
    code, err = run("score", capsys, f"prepare.model={source}")  # reads the referenced weights
    assert code == 1 and "has changed or gone since prepare ran" in error_line(err)


# --- metrics are valid JSON: an overflow is named with the fix --------------------------------------------------
def test_an_overflow_fails_naming_the_dataset_and_the_fix(project, capsys, monkeypatch):
    import gqaprune.evaluation.perplexity as recipe

    def overflowed(*args, **kwargs):
        return {"wikitext2": {"ppl": math.nan, "log_ppl_se": math.nan, "tokens": 256, "windows": 4, "capped": True,
                              "spread": True, "split": "test"}}

    monkeypatch.setattr(recipe, "perplexities", overflowed)  # what float16 logits that overflowed give
    code, err = run("evaluate_dense", capsys, "evaluate.dtype=float16")
    line = error_line(err)
    assert code == 1 and "wikitext2" in line and "bfloat16 or float32" in line, line
    assert not (project / "metrics/dense.json").exists()
    from gqaprune.errors import NonFiniteError
    from gqaprune.runtime.files import dumps

    with pytest.raises(NonFiniteError, match=r"NaN at ppl\.wikitext2"):
        dumps({"ppl": {"wikitext2": math.nan}})
    assert json.loads(dumps({"tau": math.inf})) == {"tau": ".inf"}  # valid JSON; the params loader reads it back


# --- one writer per output; SIGTERM / SIGINT clean up and say so; SIGKILL litter goes at the next run -------------
def _stage_process(project: Path, stage: str, *overrides: str) -> subprocess.Popen:
    """The stage in a subprocess whose plot writer (called after the other outputs are staged) waits for a kill.

    The child takes Python's own SIGINT handler first, as a process started from a terminal has it: under a
    non-interactive shell's background job (``pytest ... &``) SIGINT is inherited as ignored, and Python then
    leaves it ignored."""
    code = ("import signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import gqaprune.pipeline.recipes.plan as r\n"
            "def wait(*a, **k):\n    open('staged', 'w').close(); time.sleep(120)\n"
            "r.plot_kept_fraction = wait\n"
            "from gqaprune.pipeline.runner import execute; from pathlib import Path\n"
            f"sys.exit(execute({stage!r}, r.run, Path('params.yaml'), {list(overrides)!r}, False))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=project, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (project / "staged").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    return proc


def test_one_writer_signals_and_litter(project, capsys):
    from gqaprune.pipeline.runner import stage_lock

    assert run("plan", capsys)[0] == 0
    before = {p: tree_bytes(project / p) for p in ("artifacts/plan", "metrics/plan.json")}
    with stage_lock("plan"):  # another run holds the stage
        code, err = run("plan", capsys)
    assert code == 1 and f"stage plan is already running (pid {os.getpid()}); wait for it" in error_line(err)
    assert run("allocate", capsys, "plan.mlp_align=16")[0] == 0  # the killed runs plan with other settings
    for sig, code, name in ((signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")):
        proc = _stage_process(project, "plan", "plan.mlp_align=16")
        proc.send_signal(sig)
        assert proc.wait(60) == code
        assert error_line(proc.stderr.read()) == (f"error: stopped by {name}{' (Ctrl-C)' if name == 'SIGINT' else ''}"
                                                  "; the previous outputs of plan are unchanged")
        assert not list(project.glob("**/.*.staged*")) and not list(project.glob("**/.*.tmp*"))
        assert {p: tree_bytes(project / p) for p in before} == before
        (project / "staged").unlink()
    proc = _stage_process(project, "plan", "plan.mlp_align=16")
    proc.kill()  # SIGKILL: no clean-up possible
    proc.wait(60)
    assert list(project.glob("artifacts/.plan.staged*"))  # litter of the killed run
    assert run("plan", capsys, "plan.mlp_align=16")[0] == 0
    assert not list(project.glob("**/.*.staged*")) and not list(project.glob("**/.*.tmp*"))  # removed by the next


# --- inputs that do not belong together, accepted without a word before ---------------------------------------
def test_unlike_inputs_are_refused(evaluated, capsys):
    code, err = run("evaluate", capsys, "evaluate.dtype=bfloat16")  # the dense baseline is float32
    line = error_line(err)
    assert code == 1 and "evaluate.dtype: 'float32' there, 'bfloat16' here" in line and "evaluate_dense" in line
    code, err = run("calibrate", capsys, "calibrate.seq_len=100000")
    line = error_line(err)
    assert code == 1 and "calibrate.seq_len=100000" in line and "max_position_embeddings" in line, line
    code, err = run("evaluate", capsys, "evaluate.seq_len=100000", "evaluate.max_tokens=null")
    assert code == 1 and "max_position_embeddings" in error_line(err)
    other = evaluated.parent / "other-model"
    from gqaprune.models.random_models import build_model

    build_model("tiny-llama-gqa4", seed=7, vocab_size=512).save_pretrained(other)
    for f in (evaluated.parent / "tiny-model").glob("tokenizer*"):
        shutil.copy(f, other / f.name)
    assert run("prepare", capsys, f"prepare.model={other}")[0] == 0  # model.json now names another base model
    code, err = run("export", capsys, f"prepare.model={other}", "export.quantize=[]")
    line = error_line(err)
    assert code == 1 and "artifacts/model.json" in line and "base model" in line, line


# --- every bad input: one line naming the file or key and the fix ---------------------------------------------
def _missing_corpus_file(root: Path) -> list[str]:
    mirror = _mirror(root)
    (mirror / "ptb" / "ptb.test.txt").unlink()
    return [f"data.data_dir={mirror}", "evaluate.datasets=[wikitext2, ptb]"]


def _corrupt_json_corpus(root: Path) -> list[str]:
    mirror = _mirror(root)
    (mirror / "wikitext-2-raw" / "wiki.test.hf_rows.jsonl").write_text('{"text": "a"}\n{"text": \n')
    return [f"data.data_dir={mirror}"]


def _undecodable_corpus(root: Path) -> list[str]:
    mirror = _mirror(root)
    (mirror / "ptb" / "ptb.valid.txt").write_bytes(b"ok\n\xff\xfe\xfa not utf-8\n")
    return [f"data.data_dir={mirror}"]


def _heads_do_not_divide_hidden(root: Path) -> list[str]:
    folder = _model_copy(root, "bad-heads")
    config = json.loads((folder / "config.json").read_text())
    config["num_attention_heads"] = config["num_key_value_heads"] = 3
    config.pop("head_dim", None)
    (folder / "config.json").write_text(json.dumps(config))
    return [f"prepare.model={folder}"]


def _remote_code_family(root: Path) -> list[str]:
    folder = _model_copy(root, "remote-code")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="fancy", auto_map={"AutoConfig": "configuration_fancy.FancyConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    return [f"prepare.model={folder}"]


RAW_ERRORS = [
    ("missing corpus file", "prepare", _missing_corpus_file, ["ptb/ptb.test.txt", "split 'test'", "restore"]),
    ("corrupt JSON corpus", "prepare", _corrupt_json_corpus, ["wiki.test.hf_rows.jsonl", "restore"]),
    ("undecodable corpus", "prepare", _undecodable_corpus, ["ptb.valid.txt", "restore"]),
    ("heads do not divide hidden", "prepare", _heads_do_not_divide_hidden,
     ["bad-heads/config.json", "num_attention_heads=3", "fix config.json"]),
    ("unsupported family with auto_map", "prepare", _remote_code_family, ["'fancy'", "not supported"]),
]


@pytest.mark.parametrize("case, stage, make, expected", RAW_ERRORS, ids=[c[0] for c in RAW_ERRORS])
def test_bad_input_is_named_with_the_fix(project, capsys, case, stage, make, expected):
    before = {p: tree_bytes(project / p) for p in ("artifacts/model", "artifacts/model.json", "data/corpora")}
    code, err = run(stage, capsys, *make(project))
    line = error_line(err)
    assert code == 1 and "unexpected" not in line and "none given" not in line, line
    assert "trust_remote_code" not in line  # never advice to run a repository's code
    for text in expected:
        assert text in line, line
    assert {p: tree_bytes(project / p) for p in before} == before


def test_a_full_disk_names_the_file(project, capsys, monkeypatch):
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name.startswith(".pruning_analysis.json"):
            raise OSError(errno.ENOSPC, "No space left on device")  # a write() error names no file
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    code, err = run("plan", capsys)
    line = error_line(err)
    assert code == 1 and "no space left" in line and "pruning_analysis.json" in line, line
    assert not (project / "artifacts/plan").exists()


# --- `gqaprune ppl` finds the corpora as the stages do; `.inf` as DVC writes it -------------------------------------
def test_ppl_resolves_data_dir_against_the_params_file(project, data_dir):
    from typer.testing import CliRunner

    from gqaprune.cli import app

    params = _params(project)
    params["data"]["data_dir"] = os.path.relpath(data_dir, project)  # relative to params.yaml, as shipped
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "elsewhere").mkdir()
    os.chdir(project / "elsewhere")
    result = CliRunner().invoke(app, ["ppl", str(project.parent / "tiny-model"), "--params", "../params.yaml",
                                      "--max-tokens", "128", "--seq-len", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["wikitext2"]["tokens"] == 128


def test_infinity_as_dvc_writes_it(tmp_path):
    from gqaprune.config.loading import load_params
    from gqaprune.config.rules import ParamsError

    path = tmp_path / "params.yaml"
    path.write_text("plan:\n  tau: '.inf'\n")  # `dvc exp run -S plan.tau=.inf` quotes the value
    assert load_params(path).plan.tau == math.inf
    assert load_params(path, ["plan.tau=Infinity"]).plan.tau == math.inf
    with pytest.raises(ParamsError, match="plan.tau must be >= 0"):
        load_params(path, ["plan.tau='-.inf'"])  # read as a number, then checked like one
    with pytest.raises(ParamsError, match="plan.tau must be a number"):
        load_params(path, ["plan.tau=.nan"])


# --- volatile fields are no dependency of a later stage -------------------------------------------------------
def test_timings_are_no_dependency(evaluated):
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    read_metrics = {name: [d for d in stage["deps"] if d.startswith("metrics/")] for name, stage in stages.items()}
    assert {name: deps for name, deps in read_metrics.items() if deps} == {"evaluate": ["metrics/dense.json"]}
    for artifact in ("artifacts/evaluation/results.json", "metrics/dense.json"):
        text = (evaluated / artifact).read_text()
        assert "wall_time" not in text and "phases_s" not in text and "host" not in text, artifact
    assert "wall_time_s" in json.loads((evaluated / "metrics/evaluate.json").read_text())
