"""Tests for gqaprune.evaluation: perplexity protocol on a tiny random LLaMA (offline)."""

import copy
import json
import math
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gqaprune.data import windows
from gqaprune.evaluation.perplexity import PerplexityResult, PPLMetric, clear_token_cache, perplexity
from helpers import small_tokenizer

_SHORT_ROWS = [
    "",
    " = Valkyria Chronicles = \n",
    "",
    " Senjō no Valkyria is a tactical role @-@ playing video game developed by Sega . \n",
    " The game began development in 2010 , carrying over a large portion of the work . \n",
    "",
    " It met with positive sales in Japan , and was praised by both reviewers . \n",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (vocab 300) trained in memory; adds a BOS "<s>" like LLaMA."""
    return small_tokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def short_dir(tmp_path):
    """A local mirror whose wikitext2 test split is a few rows."""
    (tmp_path / "wikitext-2-raw").mkdir()
    lines = "".join(json.dumps({"text": r}) + "\n" for r in _SHORT_ROWS)
    (tmp_path / "wikitext-2-raw" / "wiki.test.hf_rows.jsonl").write_text(lines, encoding="utf-8")
    return tmp_path


def test_matches_hand_computed_loss(model, tokenizer, short_dir):
    seq_len = 15
    ids = tokenizer("\n\n".join(_SHORT_ROWS), verbose=False)["input_ids"]
    n_windows = len(ids) // seq_len
    assert n_windows >= 4 and len(ids) % seq_len  # several windows and a dropped partial tail
    windows = torch.tensor(ids[: n_windows * seq_len]).view(n_windows, seq_len)

    # by hand: log-softmax, NLL of the next token, mean over all predicted tokens
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits.double(), dim=-1)  # [n, seq_len, vocab]
        nll = -logp[:, :-1].gather(-1, windows[:, 1:, None]).squeeze(-1)  # [n, seq_len - 1]
        # and HF's own shifted-label loss, one window at a time
        hf_losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    expected = math.exp(nll.mean().item())

    res = perplexity(model, tokenizer, "wikitext2", seq_len=seq_len, batch_size=3, data_dir=short_dir)
    assert isinstance(res, PerplexityResult)
    assert res.ppl == pytest.approx(expected, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(sum(hf_losses) / n_windows), rel=1e-5)
    assert (res.dataset, res.split, res.seq_len) == ("wikitext2", "test", seq_len)
    assert res.n_windows == n_windows and res.n_tokens == n_windows * seq_len
    assert res.capped is False

    again = perplexity(model, tokenizer, "wikitext2", seq_len=seq_len, batch_size=1, data_dir=short_dir)
    assert again.ppl == pytest.approx(res.ppl, rel=1e-6)  # batching does not change the result


def test_max_tokens_caps(model, tokenizer, data_dir):
    res = perplexity(model, tokenizer, "wikitext2", seq_len=64, max_tokens=200, data_dir=data_dir)
    assert res.n_windows == 3 and res.n_tokens == 192 and res.capped is True
    more = perplexity(model, tokenizer, "wikitext2", seq_len=64, max_tokens=640, data_dir=data_dir)
    assert more.n_windows == 10 and more.n_tokens == 640 and more.capped is True
    with pytest.raises(ValueError, match="max_tokens"):
        perplexity(model, tokenizer, "wikitext2", seq_len=64, max_tokens=10, data_dir=data_dir)


def test_uniform_logits_give_vocab_size(model, tokenizer, data_dir):
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # logits all 0 -> every token has probability 1 / vocab
    res = perplexity(uniform, tokenizer, "wikitext2", seq_len=32, max_tokens=512, data_dir=data_dir)
    assert res.ppl == pytest.approx(uniform.config.vocab_size, rel=1e-3)


def test_token_cache_and_training_flag(model, tokenizer, short_dir, monkeypatch):
    clear_token_cache()
    first = perplexity(model, tokenizer, "wikitext2", seq_len=8, data_dir=short_dir)

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenised a cached evaluation text")

    monkeypatch.setattr(windows, "tokenize_text", fail)  # the cache sits in front of the tokenisation
    model.train()
    second = perplexity(model, tokenizer, "wikitext2", seq_len=8, data_dir=short_dir)
    assert model.training  # restored after evaluation
    model.eval()
    assert second.ppl == pytest.approx(first.ppl, rel=1e-9)


def test_ppl_metric(model, tokenizer, data_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CUDA fallback warning on CPU-only machines
        metric = PPLMetric(
            model,
            tokenizer,
            ["wikitext2", "ptb"],
            seq_len=32,
            batch_size=4,
            max_tokens=256,
            data_dir=data_dir,
        )
    assert isinstance(metric, dict) and list(metric) == ["wikitext2", "ptb"]
    for name, ppl in metric.items():
        result = metric.results[name]
        assert ppl == result.ppl and math.isfinite(ppl) and ppl > 1
        assert result.split == "test" and result.n_windows == 8 and result.capped


def test_bad_arguments(model, tokenizer, short_dir):
    with pytest.raises(ValueError, match="unknown evaluation dataset"):
        perplexity(model, tokenizer, "alpaca", data_dir=short_dir)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, tokenizer, "wikitext2", seq_len=1, data_dir=short_dir)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        perplexity(model, tokenizer, "wikitext2", seq_len=100_000, data_dir=short_dir)
