"""Evaluation throughput: gqaprune.evaluation.perplexity on random ids, and the same computation written inline.

The library call is fed through its per-process token cache with a stub tokenizer (no corpus, no
tokenizer needed); the inline version is batched forwards over non-overlapping windows with a float32
token NLL summed on the device and one host sync at the end.
"""

from __future__ import annotations

import math

import torch

from gqaprune.config.corpora import get_corpus
from gqaprune.data.sources import resolve_data_dir
from gqaprune.data.windows import _TOKEN_CACHE, _tokenizer_key
from gqaprune.evaluation.perplexity import perplexity

from .bench import Bench, PresetRun, random_ids


def eval_section(run: PresetRun) -> None:
    """library_s<seq>_b<batch> then inline_s<seq>_b<batch> for each --eval pair, --eval-tokens each."""
    if "eval" not in run.sections:
        return
    bench, n_tokens = run.bench, run.args.eval_tokens
    for seq, batch in run.args.eval_settings:
        bench.run("eval", f"library_s{seq}_b{batch}",
                  lambda seq=seq, batch=batch: eval_library(bench, run.model, seq, batch, n_tokens))
        bench.run("eval", f"inline_s{seq}_b{batch}",
                  lambda seq=seq, batch=batch: eval_inline(bench, run.model, seq, batch, n_tokens))


class FakeTokenizer:
    """Just enough of a tokenizer for evaluation's token cache key (the ids are injected)."""

    name_or_path = "gqaprune-benchmark-random-ids"

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1, 2, 3]}

    def __len__(self):
        return self.vocab


def eval_library(bench: Bench, model, seq: int, batch: int, n_tokens: int) -> dict:
    """gqaprune.evaluation.perplexity on random ids injected into its per-process token cache."""
    tok = FakeTokenizer(model.config.vocab_size)
    dataset = "wikitext2"
    split = get_corpus(dataset).evaluation_split
    root = resolve_data_dir(None)
    key = (_tokenizer_key(tok), dataset, split, None if root is None else str(root))
    g = torch.Generator().manual_seed(21)
    _TOKEN_CACHE[key] = torch.randint(0, model.config.vocab_size, (n_tokens + seq,), generator=g)
    kwargs = dict(dataset=dataset, seq_len=seq, batch_size=batch, max_tokens=n_tokens)
    try:
        perplexity(model, tok, **{**kwargs, "max_tokens": seq * batch})  # warm-up
        res, wall = bench.timed_call(lambda: perplexity(model, tok, **kwargs))
    finally:
        _TOKEN_CACHE.pop(key, None)
    return _eval_result(bench, seq, batch, res.n_tokens, wall, res.ppl)


def eval_inline(bench: Bench, model, seq: int, batch: int, n_tokens: int) -> dict:
    """The evaluation computation inline: batched windows, float32 NLL summed on device, one sync."""
    n_windows = n_tokens // seq
    ids = random_ids(bench, n_windows, seq, model.config.vocab_size, seed=22)

    def run():
        total = torch.zeros((), dtype=torch.float64, device=bench.device)
        with torch.inference_mode():
            for start in range(0, n_windows, batch):
                x = ids[start : start + batch]
                logits = model(input_ids=x, use_cache=False).logits
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum"
                )
                total += nll.double()
        return float(total)

    with torch.inference_mode():
        model(input_ids=ids[:batch], use_cache=False)  # warm-up
    total, wall = bench.timed_call(run)
    return _eval_result(bench, seq, batch, n_windows * seq, wall, math.exp(total / (n_windows * (seq - 1))))


def _eval_result(bench: Bench, seq: int, batch: int, tokens: int, wall: float, ppl: float) -> dict:
    return {"seq_len": seq, "batch_size": batch, "tokens": tokens, **bench.rate(tokens, wall, ppl=ppl)}
