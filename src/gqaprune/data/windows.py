"""Token windows of a corpus: the one tokenisation rule, calibration samples, held-out and text windows.

Text protocol (LLM-Pruner's perplexity protocol, used for calibration too):

* All rows of the split, in order, are joined with ``"\\n\\n"`` into one string (empty rows are kept,
  so wikitext's blank rows give runs of newlines exactly as in LLM-Pruner/GPTQ).
* The string is tokenised **once** with the tokenizer's default special tokens: a tokenizer that adds
  a BOS (LLaMA, Mistral) puts exactly one BOS at position 0 of the stream; one that adds none (Qwen2)
  adds none.
* Evaluation (:mod:`gqaprune.evaluation.perplexity`) cuts the stream into non-overlapping windows of
  ``seq_len`` tokens starting at token 0 and drops the final partial window.
* Calibration (:func:`calibration_samples`) draws ``n_samples`` window starts uniformly from
  ``[0, n_tokens - seq_len]`` with a seeded ``torch.Generator`` (with replacement) and returns those
  windows of exactly ``seq_len`` tokens.

Calibration and evaluation never share text: each corpus names disjoint calibration and evaluation
splits and the functions here refuse an evaluation split. Note: LLM-Pruner evaluates PTB on the
*validation* split; here PTB is evaluated on ``test`` (as the project spec asks).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from gqaprune.config.corpora import calibration_corpora, get_corpus
from gqaprune.data.sources import check_split, load_rows, resolve_data_dir
from gqaprune.errors import InputError


def join_rows(rows: Sequence[str]) -> str:
    """Join rows into the single evaluation/calibration string: ``"\\n\\n".join(rows)``."""
    return "\n\n".join(rows)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenise ``text`` in one call with the tokenizer's default special tokens.

    Returns a 1-D ``torch.long`` tensor ``[n_tokens]``. A tokenizer that adds a BOS adds it once, at
    position 0. The "sequence longer than model max length" warning is suppressed (the stream is
    cut into windows afterwards, never fed whole).
    """
    enc = tokenizer(text, add_special_tokens=True, return_attention_mask=False, verbose=False)
    return torch.tensor(enc["input_ids"], dtype=torch.long)


def corpus_token_ids(
    tokenizer,
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Token ids ``[n_tokens]`` (``torch.long``) of a corpus split: rows joined, tokenised once.

    Cached in-process per (tokenizer, corpus, split, data folder), so a stage that draws calibration
    samples and held-out windows from one split, or evaluates several models, tokenises it once. The
    returned tensor is shared: do not modify it in place.
    """
    if path is not None:
        return tokenize_text(tokenizer, join_rows(load_rows(name, split, data_dir=data_dir, path=path)))
    root = resolve_data_dir(data_dir)
    key = (_tokenizer_key(tokenizer), name, split, None if root is None else str(root))
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = tokenize_text(tokenizer, join_rows(load_rows(name, split, data_dir=data_dir)))
    return _TOKEN_CACHE[key]


# (tokenizer fingerprint, corpus, split, data folder) -> token ids [n_tokens] (torch.long, CPU)
_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}
_PROBE = "The quick brown fox, 1234 \n\n= Héllo =\n"  # tells tokenizers with equal name/size apart


def _tokenizer_key(tokenizer) -> tuple:
    probe = tuple(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), probe)


def clear_token_cache() -> None:
    """Forget all cached tokenised corpora."""
    _TOKEN_CACHE.clear()


def calibration_samples(
    tokenizer,
    name: str,
    split: str | None,
    n_samples: int,
    seq_len: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Draw ``n_samples`` calibration windows of exactly ``seq_len`` tokens.

    The split's rows are joined with ``"\\n\\n"`` and tokenised once (see module docstring);
    window starts are drawn uniformly from ``[0, n_tokens - seq_len]`` by
    ``torch.randint`` with a ``torch.Generator`` seeded with ``seed`` (with replacement), so the
    result is a deterministic function of (tokenizer, text, n_samples, seq_len, seed).

    Args:
        split: ``None`` for the corpus' calibration split; an evaluation split is refused.

    Returns:
        ``torch.long`` tensor ``[n_samples, seq_len]``.

    Raises:
        ValueError: non-positive ``n_samples``/``seq_len``, unknown corpus/split, an evaluation
            split, or a text with fewer than ``n_samples * seq_len`` tokens.
        DataNotFoundError: the corpus could not be found.
    """
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples <= 0:
        raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    corpus = get_corpus(name)
    if not corpus.calibration_split:
        raise ValueError(f"cannot calibrate on {name!r}; calibration corpora: {calibration_corpora()}")
    split = corpus.calibration_split if split is None else split
    check_split(name, split)
    if split == corpus.evaluation_split:
        raise ValueError(
            f"{name} split {split!r} is the evaluation split; calibrate on another split "
            f"(default {corpus.calibration_split!r}) so calibration and evaluation text do not overlap"
        )

    ids = corpus_token_ids(tokenizer, name, split, data_dir=data_dir)  # [n_tokens]
    n_tokens = int(ids.numel())
    if n_tokens < n_samples * seq_len:
        raise InputError(
            f"{name} split {split!r} has {n_tokens} tokens, too short for {n_samples} samples x "
            f"{seq_len} tokens = {n_samples * seq_len}; ask for fewer or shorter samples"
        )
    starts = calibration_starts(n_tokens, n_samples, seq_len, seed)  # [n_samples]
    offsets = torch.arange(seq_len)  # [seq_len]
    return ids[starts[:, None] + offsets[None, :]]  # [n_samples, seq_len]


def calibration_starts(n_tokens: int, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Start offsets ``[n_samples]`` of the windows :func:`calibration_samples` draws (same seed rule)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n_tokens - seq_len + 1, (n_samples,), generator=gen)


def heldout_windows(
    tokenizer,
    name: str,
    split: str | None,
    n_windows: int,
    seq_len: int,
    exclude_samples: int,
    exclude_seq_len: int,
    seed: int,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Held-out calibration windows ``[n_windows, seq_len]``: same split, no token shared with calibration.

    The split's stream (as for :func:`calibration_samples`) is cut into non-overlapping windows of
    ``seq_len``; those that overlap any of the ``exclude_samples`` x ``exclude_seq_len`` windows that
    :func:`calibration_samples` draws with ``seed`` are dropped, and ``n_windows`` of the rest are taken
    evenly spread over the split. Used to choose settings (allocation, compensation) on data that
    neither fitted them nor belongs to an evaluation split.

    Raises:
        ValueError: an evaluation split, or too few free windows.
    """
    if n_windows <= 0 or seq_len <= 1:
        raise ValueError(f"need n_windows >= 1 and seq_len >= 2, got {n_windows}, {seq_len}")
    split = get_corpus(name).calibration_split if split is None else split
    check_split(name, split)
    if split == get_corpus(name).evaluation_split:
        raise ValueError(f"{name} split {split!r} is the evaluation split; held-out windows come from calibration text")
    ids = corpus_token_ids(tokenizer, name, split, data_dir=data_dir)
    n_tokens = int(ids.numel())
    used = torch.zeros(n_tokens, dtype=torch.bool)
    if exclude_samples > 0 and n_tokens >= exclude_seq_len:
        for s in calibration_starts(n_tokens, exclude_samples, exclude_seq_len, seed).tolist():
            used[s : s + exclude_seq_len] = True
    n_grid = n_tokens // seq_len
    free = torch.nonzero(~used[: n_grid * seq_len].view(n_grid, seq_len).any(1)).flatten()
    if len(free) < n_windows:
        raise ValueError(f"{name} split {split!r} has {len(free)} windows of {seq_len} tokens free of calibration "
                         f"text, fewer than the {n_windows} asked")
    pick = free[torch.linspace(0, len(free) - 1, n_windows, dtype=torch.float64).round().long()]
    return ids[: n_grid * seq_len].view(n_grid, seq_len)[pick]  # [n_windows, seq_len]


def calibration_text_windows(tokenizer, names: Sequence[str], seq_len: int,
                             data_dir: str | os.PathLike | None = None,
                             exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Every non-overlapping window ``[n, seq_len]`` of the calibration splits of ``names``, in order, minus
    the rows equal to a row of ``exclude`` (held-out windows). Training text for distillation: calibration
    text only, never an evaluation split."""
    parts = []
    for name in names:
        ids = corpus_token_ids(tokenizer, name, get_corpus(name).calibration_split, data_dir=data_dir)
        parts.append(ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len))
    windows = torch.cat(parts)
    if exclude is not None and len(exclude):
        held = {tuple(row.tolist()) for row in exclude}
        windows = windows[torch.tensor([tuple(row.tolist()) not in held for row in windows], dtype=torch.bool)]
    return windows
