"""The pipeline keeps its promises under bad input, interruption and edits (issue 9).

Stages run in-process (``gqaprune.pipeline.runner.execute``, what ``stages/<name>.py`` calls) in a scratch project
folder holding a tiny random LLaMA with a real byte-level BPE tokenizer; one test runs the real stage
command in a subprocess to check the one-line error end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from gqaprune.errors import NonFiniteError
from gqaprune.models.fingerprint import fingerprint, fingerprint_files
from gqaprune.models.random_models import build_model
from gqaprune.pipeline.artifacts import read_table, stage_outputs, write_table
from gqaprune.runtime.files import atomic_dir, write_json
from helpers import error_line, run, tree_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]




# --- bad inputs: one line naming the key or file, exit code 1, before heavy work -----------------------
def _missing_folder(root: Path) -> list[str]:
    return ["prepare.model=./no/such/model"]


def _no_config(root: Path) -> list[str]:
    folder = root.parent / "no-config"
    shutil.copytree(root.parent / "tiny-model", folder)
    (folder / "config.json").unlink()
    return [f"prepare.model={folder}"]


def _truncated_weights(root: Path) -> list[str]:
    folder = root.parent / "truncated"
    shutil.copytree(root.parent / "tiny-model", folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return [f"prepare.model={folder}"]


def _empty_corpus(root: Path) -> list[str]:
    mirror = root.parent / "mirror"
    shutil.copytree(yaml.safe_load((root / "params.yaml").read_text())["data"]["data_dir"], mirror)
    (mirror / "ptb" / "ptb.test.txt").write_text("")
    return [f"data.data_dir={mirror}", "evaluate.datasets=[wikitext2, ptb]"]


def _missing_data_dir(root: Path) -> list[str]:
    return [f"data.data_dir={root.parent / 'nowhere'}"]


def _hub_id_offline(root: Path) -> list[str]:
    return ["prepare.model=someorg/somemodel"]


def _unsupported_family(root: Path) -> list[str]:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = root.parent / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(folder)
    return [f"prepare.model={folder}"]


def _nan_weight(root: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    folder = root.parent / "nan-model"
    shutil.copytree(root.parent / "tiny-model", folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][5, 7] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return [f"prepare.model={folder}"]


def _two_bad_params(root: Path) -> list[str]:
    return ["plan.ratio=1.5", "calibrate.n_samples=0"]


BAD_INPUTS = [
    ("missing model folder", "prepare", _missing_folder, ["no/such/model", "does not exist"]),
    ("folder without config.json", "prepare", _no_config, ["no-config", "config.json"]),
    ("truncated safetensors", "prepare", _truncated_weights, ["model.safetensors", "truncated"]),
    ("empty corpus file", "prepare", _empty_corpus, ["ptb.test.txt", "holds no text"]),
    ("data_dir that does not exist", "prepare", _missing_data_dir, ["nowhere", "does not exist"]),
    ("hub id while offline", "prepare", _hub_id_offline, ["someorg/somemodel", "not reachable"]),
    ("unsupported family", "prepare", _unsupported_family, ["gpt2", "not supported"]),
    ("NaN weight", "prepare", _nan_weight, ["model.layers.1.mlp.up_proj.weight", "decoder layer 1", "non-finite"]),
    ("two bad params at once", "score", _two_bad_params, ["plan.ratio must be in (0, 1)",
                                                           "calibrate.n_samples must be >= 1"]),
]


@pytest.mark.parametrize("case, stage, make, expected", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_keeps_outputs(project, capsys, case, stage, make, expected):
    before = {p: tree_bytes(project / p) for p in ("artifacts/model.json", "artifacts/model", "data/corpora")}
    started = time.perf_counter()
    code, err = run(stage, capsys, *make(project))
    assert code == 1
    line = error_line(err)
    for text in expected:
        assert text in line, line
    assert time.perf_counter() - started < 20  # cheap checks first: no retries, no heavy work
    after = {p: tree_bytes(project / p) for p in before}
    assert after == before  # a failed stage leaves the previous outputs as they were
    assert not list(project.glob("**/.*.staged*"))  # and no staged leftovers


def test_missing_artifact_and_debug_traceback(project, capsys, monkeypatch):
    shutil.rmtree(project / "artifacts" / "calibration")
    code, err = run("score", capsys)
    assert code == 1 and "calibration" in error_line(err) and "calibrate stage" in err
    monkeypatch.setenv("GQAPRUNE_DEBUG", "1")
    code, err = run("score", capsys)
    assert code == 1 and "Traceback" in err  # debugging asked for: the traceback too


def test_the_stage_command_prints_one_line(project):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / "prepare.py"), "-S",
                           "prepare.model=./missing"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert error_line(proc.stderr).startswith("error: prepare.model: model folder")


def test_failed_stage_replaces_nothing(project, capsys, monkeypatch):
    """A prepare that fails after building the new model folder keeps the old folder *and* model.json."""
    import gqaprune.pipeline.recipes.prepare as prepare

    before = {p: tree_bytes(project / p) for p in ("artifacts/model.json", "artifacts/model", "data/corpora")}
    other = project.parent / "other-model"
    tokenizer_dir = project.parent / "tiny-model"
    build_model("tiny-llama-gqa4", seed=5, vocab_size=512).save_pretrained(other)
    for f in tokenizer_dir.glob("tokenizer*"):
        shutil.copy(f, other / f.name)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(prepare, "meta_model", boom)  # fails after model folder and corpora are written
    code, err = run("prepare", capsys, f"prepare.model={other}")
    assert code == 1 and "disk full" in error_line(err)
    assert {p: tree_bytes(project / p) for p in before} == before


def test_model_folder_and_record_must_agree(project, capsys):
    record = json.loads((project / "artifacts/model.json").read_text())
    record["fingerprint"] = "0123456789abcdef"
    (project / "artifacts/model.json").write_text(json.dumps(record))
    code, err = run("score", capsys)
    assert code == 1 and "re-run prepare" in error_line(err)


def test_plan_refuses_scores_of_another_model(project, capsys):
    scores, meta = read_table(project / "artifacts/scores/importance.parquet")
    write_table(project / "artifacts/scores/importance.parquet", scores, {**meta, "fingerprint": "feedfacefeedface"})
    code, err = run("plan", capsys)
    line = error_line(err)  # the allocation was chosen on other scores, and the scores are of another model
    assert code == 1 and ("computed on model 'feedfacefeedface'" in line or "made from the scores" in line), line
    assert not (project / "artifacts/plan").exists()  # refused before writing anything
    allocation = json.loads((project / "artifacts/allocate/allocation.json").read_text())
    allocation.pop("inputs")  # an allocation that records no scores id: the scores' own check answers
    (project / "artifacts/allocate/allocation.json").write_text(json.dumps(allocation))
    code, err = run("plan", capsys)
    assert code == 1 and "computed on model 'feedfacefeedface'" in error_line(err)


@pytest.mark.parametrize("overrides", [
    ["plan.strategy=hgsp", "plan.temperature=0"],
    ["plan.strategy=hgsp", "plan.temperature=1", "plan.tau=.inf"],
    ["plan.strategy=uniform", "plan.temperature=0"],
    ["plan.strategy=layer", "plan.temperature=0"],  # failed with "needs the similarity table"
    ["plan.strategy=layer", "plan.temperature=1"],
])
def test_every_strategy_through_the_stage(project, capsys, overrides):
    assert run("allocate", capsys, "allocate.mode=fixed")[0] == 0  # the plan section as written
    code, err = run("plan", capsys, "allocate.mode=fixed", *overrides)
    assert code == 0, err
    analysis = json.loads((project / "artifacts/plan/pruning_analysis.json").read_text())
    assert analysis["params_removed"] > 0
    assert "timings_s" not in analysis  # timings are metrics, not artifacts


# --- bytes: equal content, equal bytes -----------------------------------------------------------------
def test_rescoring_gives_identical_bytes(project, capsys):
    first = (project / "artifacts/scores/importance.parquet").read_bytes()
    assert run("score", capsys)[0] == 0
    assert (project / "artifacts/scores/importance.parquet").read_bytes() == first


def test_recalibrating_gives_identical_bytes(project):
    folder = project / "artifacts/calibration"
    first = {f.name: f.read_bytes() for f in folder.glob("*.safetensors")}
    assert set(first) == {"samples.safetensors", "heldout.safetensors"}
    # a separate process (safetensors' own writer ordered the metadata differently per process)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "gqaprune.pipeline.runner", "calibrate"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {f.name: f.read_bytes() for f in folder.glob("*.safetensors")} == first


def test_safetensors_metadata_order_does_not_change_bytes(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from gqaprune.models.checkpoint import write_safetensors

    ids = torch.arange(12).view(3, 4)
    write_safetensors([("input_ids", ids)], tmp_path / "one.safetensors", {"seed": "0", "dataset": "ptb", "n": "3"})
    write_safetensors([("input_ids", ids)], tmp_path / "two.safetensors", {"n": "3", "dataset": "ptb", "seed": "0"})
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    with safe_open(str(tmp_path / "one.safetensors"), "pt") as f:  # the library's own reader agrees
        assert f.metadata() == {"format": "pt", "seed": "0", "dataset": "ptb", "n": "3"}
    assert torch.equal(load_file(str(tmp_path / "one.safetensors"))["input_ids"], ids)


def test_table_metadata_order_does_not_change_bytes(tmp_path):
    import pandas as pd

    df = pd.DataFrame({"a": [1, 2], "b": [0.5, 1.5]})
    write_table(tmp_path / "one.parquet", df, {"x": 1, "y": {"p": 1, "q": 2}})
    write_table(tmp_path / "two.parquet", df, {"y": {"q": 2, "p": 1}, "x": 1})
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "two.parquet").read_bytes()


def test_lora_adapter_config_is_byte_stable(tmp_path):
    from peft import LoraConfig, get_peft_model

    from gqaprune.recovery.lora import save_adapter

    def adapter_config(path: Path) -> bytes:
        model = build_model("tiny-llama-gqa4")
        modules = ["v_proj", "q_proj", "down_proj", "up_proj", "k_proj", "o_proj", "gate_proj"]
        peft = get_peft_model(model, LoraConfig(r=2, target_modules=modules))
        save_adapter(peft, path)
        return (path / "adapter_config.json").read_bytes()

    text = adapter_config(tmp_path / "a")
    assert text == adapter_config(tmp_path / "b")
    modules = json.loads(text)["target_modules"]
    assert modules == sorted(modules)


# --- links into the DVC cache are replaced, never written through ------------------------------------
def test_writers_never_write_through_links(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    work = tmp_path / "work"
    (work / "folder").mkdir(parents=True)
    objects = {}
    for i, target in enumerate([work / "hard.json", work / "sym.json", work / "folder" / "inside.json"]):
        obj = cache / f"obj{i}"
        obj.write_text(f"cache object {i}")
        objects[obj] = obj.read_text()
        if target.name == "sym.json":
            target.symlink_to(obj)
        else:
            os.link(obj, target)
    write_json(work / "hard.json", {"new": 1})
    write_json(work / "sym.json", {"new": 2})
    with atomic_dir(work / "folder") as tmp:
        (tmp / "inside.json").write_text("new")
    with stage_outputs([work / "hard.json"]) as out:
        write_json(out(work / "hard.json"), {"newer": 3})
    assert json.loads((work / "hard.json").read_text()) == {"newer": 3}
    assert (work / "folder" / "inside.json").read_text() == "new"
    for obj, text in objects.items():
        assert obj.read_text() == text  # every cache object untouched


def test_prepare_with_an_empty_corpus_leaves_cache_objects_intact(project, capsys):
    """The reported corruption: a direct prepare with an empty corpus file truncated a hard-linked cache object."""
    rel = "wikitext-2-raw/wiki.test.hf_rows.jsonl"
    snapshot = project / "data/corpora" / rel
    cache_obj = project.parent / "cache-object"
    shutil.copy(snapshot, cache_obj)
    snapshot.unlink()
    os.link(cache_obj, snapshot)  # what `cache.type: hardlink` leaves in the workspace
    original = cache_obj.read_bytes()
    mirror = project.parent / "mirror"
    shutil.copytree(yaml.safe_load((project / "params.yaml").read_text())["data"]["data_dir"], mirror)
    (mirror / rel).write_text("")
    code, err = run("prepare", capsys, f"data.data_dir={mirror}")
    assert code == 1 and "holds no text" in error_line(err)
    assert cache_obj.read_bytes() == original and snapshot.read_bytes() == original


# --- fingerprints ---------------------------------------------------------------------------------
def test_fingerprint_sees_every_weight_and_agrees_across_dtypes_and_files(tmp_path):
    model = build_model("tiny-qwen2-gqa7")
    base = fingerprint(model)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[-1, -1] += 0.01  # the very last value of a late tensor
    assert fingerprint(model) != base
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[-1, -1] -= 0.01
    assert fingerprint(model) == base
    import copy

    assert fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == base  # a bf16 copy of the same checkpoint
    model.save_pretrained(tmp_path / "m")
    assert fingerprint_files(tmp_path / "m", model.config) == base
    tied = build_model("tiny-llama-gqa3")  # tied head: stored once
    tied.save_pretrained(tmp_path / "tied")
    assert fingerprint_files(tmp_path / "tied", tied.config) == fingerprint(tied)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight \(decoder layer 1\)"):
        fingerprint(model)
