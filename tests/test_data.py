"""Tests for gqaprune.data: corpora by name, resolution order, calibration samples (offline)."""

import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from gqaprune.config.corpora import CORPORA
from gqaprune.data import sources
from gqaprune.data.sources import DATA_DIR_ENV, DataNotFoundError, load_instructions, load_rows, resolve_data_dir
from gqaprune.data.windows import calibration_samples, corpus_token_ids, join_rows
from helpers import small_tokenizer


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (vocab 300) trained in memory; adds a BOS "<s>" like LLaMA."""
    return small_tokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def no_hub(monkeypatch):
    """Make the hub step fail at once, as it does offline (without its ~25 s of retries)."""

    def offline(name, split):
        raise ConnectionError("hub unreachable (test)")

    monkeypatch.setattr(sources, "_load_from_hub", offline)


# --- rows -------------------------------------------------------------------------------------


def test_wikitext2_rows(data_dir):
    test = load_rows("wikitext2", "test", data_dir=data_dir)
    valid = load_rows("wikitext2", "validation", data_dir=data_dir)
    assert len(test) == 4358
    assert len(valid) == 3760
    assert test[:2] == ["", " = Robert Boulter = \n"]
    assert valid[1] == " = Homarus gammarus = \n"
    assert sum(1 for r in valid if r) == 2461
    # size of the LLM-Pruner/SparseGPT evaluation string, as published in the data README
    assert len(join_rows(test).encode("utf-8")) == 1_296_370


def test_wikitext2_raw_file_gives_same_rows(data_dir):
    from_raw = load_rows("wikitext2", "test", path=data_dir / "wikitext-2-raw" / "wiki.test.raw")
    assert from_raw == load_rows("wikitext2", "test", data_dir=data_dir)


def test_ptb_rows(data_dir):
    test = load_rows("ptb", "test", data_dir=data_dir)
    assert len(test) == 3761
    assert test[0] == "no it was n't black monday"
    assert all(r == r.strip() for r in test)
    assert len(load_rows("ptb", "validation", data_dir=data_dir)) == 3370


def test_c4_halves_disjoint(data_dir):
    cal = load_rows("c4", "calibration", data_dir=data_dir)
    val = load_rows("c4", "validation", data_dir=data_dir)
    assert len(cal) == len(val) == 1000
    assert not set(cal) & set(val)
    jsonl = data_dir / "c4" / "c4_validation_2k.jsonl"
    docs = [json.loads(line)["text"] for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert cal == docs[:1000] and val == docs[1000:]  # parquet (mirror) == jsonl, file order
    assert load_rows("c4", "validation", path=jsonl) == val


def test_env_var_is_used(data_dir, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    assert len(load_rows("ptb", "test")) == 3761
    assert resolve_data_dir() == data_dir
    assert resolve_data_dir("elsewhere") != data_dir  # the argument wins over the env var


def test_not_found_lists_every_place(tmp_path, monkeypatch, no_hub):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(DataNotFoundError) as err:
        load_rows("wikitext2", "train", data_dir=tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path / "wikitext-2-raw" / "wiki.train.hf_rows.jsonl") in msg
    assert "Hugging Face hub wikitext/wikitext-2-raw-v1" in msg and "hub unreachable (test)" in msg

    with pytest.raises(DataNotFoundError, match=DATA_DIR_ENV):  # nothing configured
        load_rows("c4", "validation")

    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataNotFoundError, match="nope.jsonl"):  # explicit path: no fallback
        load_rows("wikitext2", "test", path=missing)


def test_the_real_data_dir_has_no_wikitext_train(data_dir, no_hub):
    with pytest.raises(DataNotFoundError, match="wiki.train.hf_rows.jsonl"):
        load_rows("wikitext2", "train", data_dir=data_dir)


def test_bad_names():
    with pytest.raises(ValueError, match="unknown corpus"):
        load_rows("wikitext3", "test")
    with pytest.raises(ValueError, match="no split"):
        load_rows("c4", "train")
    with pytest.raises(ValueError, match="load_instructions"):
        load_rows("alpaca", "train")


def test_alpaca(data_dir):
    records = load_instructions("alpaca", "train", data_dir=data_dir)
    assert len(records) == 1199
    assert all(set(r) == {"instruction", "input", "output"} for r in records)
    assert all(isinstance(v, str) for r in records for v in r.values())
    assert records[0]["instruction"] == "Give three tips for staying healthy."
    assert records[199]["instruction"] == "Describe the impact of the coronavirus on the economy."
    one = load_instructions(path=data_dir / "alpaca" / "alpaca_data_first200.json")
    assert one == records[:200]


# --- calibration ------------------------------------------------------------------------------


def test_split_roles_never_overlap():
    roles = {name: (c.calibration_split, c.evaluation_split) for name, c in CORPORA.items() if not c.instructions}
    assert roles == {"wikitext2": ("validation", "test"), "ptb": ("train", "test"), "c4": ("calibration", "validation"),
                     "code": ("calibration", "validation")}
    for calibration, evaluation in roles.values():
        assert calibration != evaluation


def test_calibration_samples(tokenizer, data_dir):
    ids = corpus_token_ids(tokenizer, "wikitext2", "validation", data_dir=data_dir)
    assert ids.dtype == torch.long and ids[0].item() == tokenizer.bos_token_id
    assert (ids == tokenizer.bos_token_id).sum().item() == 1  # one BOS, at token 0 only

    out = calibration_samples(tokenizer, "wikitext2", None, 6, 32, seed=0, data_dir=data_dir)
    assert out.shape == (6, 32) and out.dtype == torch.long
    # every sample is a contiguous window of the validation (= calibration) token stream
    all_windows = ids.unfold(0, 32, 1)  # [n_tokens - 31, 32]
    for sample in out:
        assert (all_windows == sample).all(dim=1).any()


def test_calibration_samples_deterministic(tokenizer, data_dir, tmp_path):
    rows = load_rows("wikitext2", "validation", data_dir=data_dir)[:300]
    (tmp_path / "wikitext-2-raw").mkdir()
    lines = "".join(json.dumps({"text": r}) + "\n" for r in rows)
    (tmp_path / "wikitext-2-raw" / "wiki.valid.hf_rows.jsonl").write_text(lines, encoding="utf-8")

    a = calibration_samples(tokenizer, "wikitext2", None, 8, 16, seed=0, data_dir=tmp_path)
    b = calibration_samples(tokenizer, "wikitext2", "validation", 8, 16, seed=0, data_dir=tmp_path)
    c = calibration_samples(tokenizer, "wikitext2", None, 8, 16, seed=1, data_dir=tmp_path)
    assert a.shape == (8, 16)
    assert torch.equal(a, b)  # deterministic; None means the calibration split
    assert not torch.equal(a, c)  # the seed matters


def test_calibration_refusals(tokenizer, data_dir):
    with pytest.raises(ValueError, match="evaluation split"):
        calibration_samples(tokenizer, "wikitext2", "test", 4, 32, seed=0, data_dir=data_dir)
    with pytest.raises(ValueError, match="evaluation split"):
        calibration_samples(tokenizer, "c4", "validation", 4, 32, seed=0, data_dir=data_dir)
    with pytest.raises(ValueError, match="n_samples"):
        calibration_samples(tokenizer, "wikitext2", None, 0, 32, seed=0, data_dir=data_dir)
    with pytest.raises(ValueError, match="seq_len"):
        calibration_samples(tokenizer, "wikitext2", None, 4, -1, seed=0, data_dir=data_dir)


def test_instruction_calibration_text_never_holds_the_heldout_records(data_dir):
    """alpaca calibrates on its training records rendered as the model sees them; the records the evaluate
    stages score are never in that text."""
    from gqaprune.data.instructions import instruction_records, instruction_text
    from gqaprune.data.windows import mix_counts, mixed_calibration_samples

    tok = small_tokenizer()
    held = instruction_records("alpaca", "heldout", data_dir)
    train = instruction_records("alpaca", "train", data_dir)
    assert len(held) == 100 and len(train) + len(held) <= 1199 and not {r["output"] for r in held} & {
        r["output"] for r in train}
    text, templated = instruction_text(tok, train)
    assert not templated and "### Response:" in text  # no chat template: the Alpaca format
    assert not any(r["output"] in text for r in held if len(r["output"]) > 40)
    ids = corpus_token_ids(tok, "alpaca", "train", data_dir=data_dir)
    samples = calibration_samples(tok, "alpaca", None, 4, 32, seed=0, data_dir=data_dir)
    assert samples.shape == (4, 32) and int(samples.max()) < len(tok) and ids.numel() > 10_000
    assert mix_counts({"wikitext2": 0.5, "alpaca": 0.25, "code": 0.25}, 10) == {"wikitext2": 5, "alpaca": 3,
                                                                                "code": 2}
    assert mix_counts({"wikitext2": 10, "alpaca": 0.01}, 4) == {"wikitext2": 3, "alpaca": 1}
    mixed, counts = mixed_calibration_samples(tok, {"wikitext2": 1, "alpaca": 1}, 6, 32, 0, data_dir)
    assert mixed.shape == (6, 32) and counts == {"wikitext2": 3, "alpaca": 3}
    assert torch.equal(mixed[3:], calibration_samples(tok, "alpaca", None, 3, 32, seed=0, data_dir=data_dir))


def test_calibration_text_too_short(tokenizer, tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.train.txt").write_text(" a short line \n another one \n", encoding="utf-8")
    n = corpus_token_ids(tokenizer, "ptb", "train", data_dir=tmp_path).numel()
    out = calibration_samples(tokenizer, "ptb", None, 1, n, seed=0, data_dir=tmp_path)
    assert out.shape == (1, n)  # the whole text is exactly one window
    with pytest.raises(ValueError, match="too short"):
        calibration_samples(tokenizer, "ptb", None, 1, n + 1, seed=0, data_dir=tmp_path)
    with pytest.raises(ValueError, match="too short"):
        calibration_samples(tokenizer, "ptb", None, 2, n // 2 + 1, seed=0, data_dir=tmp_path)
