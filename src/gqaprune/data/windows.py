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

    An instruction corpus' split is its training records (never the held-out ones) rendered as the
    model sees them, chat template included (:func:`gqaprune.data.instructions.instruction_text`).
    Cached in-process per (tokenizer, corpus, split, data folder), so a stage that draws calibration
    samples and held-out windows from one split, or evaluates several models, tokenises it once. The
    returned tensor is shared: do not modify it in place.
    """
    if get_corpus(name).instructions:
        return _instruction_token_ids(tokenizer, name, data_dir)
    if path is not None:
        return tokenize_text(tokenizer, join_rows(load_rows(name, split, data_dir=data_dir, path=path)))
    root = resolve_data_dir(data_dir)
    key = (_tokenizer_key(tokenizer), name, split, None if root is None else str(root))
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = tokenize_text(tokenizer, join_rows(load_rows(name, split, data_dir=data_dir)))
    return _TOKEN_CACHE[key]


def _instruction_token_ids(tokenizer, name: str, data_dir) -> torch.Tensor:
    """The training records of an instruction corpus rendered and tokenised as one stream (cached)."""
    from gqaprune.data.instructions import instruction_records, instruction_text

    root = resolve_data_dir(data_dir)
    key = (_tokenizer_key(tokenizer), name, "train-records", None if root is None else str(root))
    if key not in _TOKEN_CACHE:
        text, templated = instruction_text(tokenizer, instruction_records(name, "train", data_dir))
        enc = tokenizer(text, add_special_tokens=not templated, return_attention_mask=False, verbose=False)
        _TOKEN_CACHE[key] = torch.tensor(enc["input_ids"], dtype=torch.long)
    return _TOKEN_CACHE[key]


def resolve_mix(mix: str | dict[str, float], tokenizer) -> dict[str, float]:
    """A corpus mix as ``{corpus: weight}``: ``auto`` is the model's own uses (:data:`gqaprune.config.choices.
    AUTO_MIX_CHAT` when the tokenizer has a chat template, else :data:`~gqaprune.config.choices.AUTO_MIX_PLAIN`)."""
    from gqaprune.config.choices import AUTO_MIX_CHAT, AUTO_MIX_PLAIN
    from gqaprune.data.instructions import has_chat_template

    if mix != "auto":
        return dict(mix)
    return dict(AUTO_MIX_CHAT if has_chat_template(tokenizer) else AUTO_MIX_PLAIN)


def mix_counts(mix: dict[str, float], n: int) -> dict[str, int]:
    """``n`` items shared by the mix's weights (largest remainders; every corpus with weight > 0 gets at least
    one when ``n`` allows), in the mix's order."""
    names = [k for k, w in mix.items() if w > 0]
    if not names:
        raise ValueError(f"the mix {mix} has no corpus with a weight > 0")
    total = sum(mix[k] for k in names)
    exact = {k: n * mix[k] / total for k in names}
    counts = {k: int(exact[k]) for k in names}
    for k in sorted(names, key=lambda k: (counts[k] - exact[k], names.index(k)))[: n - sum(counts.values())]:
        counts[k] += 1
    for k in names:  # a named corpus is never left out while another has two or more
        if counts[k] == 0:
            donor = max(names, key=lambda j: counts[j])
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[k] = 1
    return counts


def mixed_calibration_samples(tokenizer, mix: dict[str, float], n_samples: int, seq_len: int, seed: int,
                              data_dir: str | os.PathLike | None = None) -> tuple[torch.Tensor, dict[str, int]]:
    """Calibration windows ``[n_samples, seq_len]`` drawn from several corpora by weight (:func:`mix_counts`):
    each corpus' share by :func:`calibration_samples` from its calibration split, concatenated in the mix's
    order. Returns the windows and the number drawn from each corpus."""
    counts = mix_counts(mix, n_samples)
    parts = [calibration_samples(tokenizer, name, None, k, seq_len, seed, data_dir=data_dir)
             for name, k in counts.items() if k]
    return torch.cat(parts), counts


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


def mixed_text_windows(tokenizer, mix: dict[str, float], seq_len: int, data_dir: str | os.PathLike | None = None,
                       exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Training windows ``[n, seq_len]`` from the calibration splits of a weighted mix: each corpus'
    windows (:func:`calibration_text_windows`, held-out windows excluded) taken evenly over the corpus so
    that the corpora's shares match their weights, as many as the scarcest corpus allows; in mix order."""
    windows = {name: calibration_text_windows(tokenizer, [name], seq_len, data_dir, exclude) for name in mix}
    total = sum(mix.values())
    n = min(int(len(w) * total / mix[name]) for name, w in windows.items())
    counts = mix_counts(mix, n)
    parts = []
    for name, w in windows.items():
        pick = torch.linspace(0, len(w) - 1, counts[name], dtype=torch.float64).round().long() if counts[name] else []
        parts.append(w[pick])
    return torch.cat(parts)


def recovery_data(tokenizer, mix: dict[str, float], seq_len: int, data_dir: str | os.PathLike | None = None,
                  exclude: torch.Tensor | None = None) -> tuple[list, torch.Tensor | None]:
    """(instruction records, text windows ``[n, seq_len]`` or None) of a recovery mix: an instruction corpus
    gives its training records (held-out records never), a text corpus windows of its calibration split
    (``exclude``: the held-out windows, never trained on), the text share of the examples matching the text
    corpora's share of the weight."""
    from gqaprune.data.instructions import instruction_records

    instruct = {k: w for k, w in mix.items() if get_corpus(k).instructions}
    text = {k: w for k, w in mix.items() if k not in instruct}
    records = [r for name in instruct for r in instruction_records(name, "train", data_dir)]
    windows = mixed_text_windows(tokenizer, text, seq_len, data_dir, exclude) if text else None
    if windows is not None and records:
        keep = round(len(records) * sum(text.values()) / sum(instruct.values()))
        windows = windows[torch.linspace(0, len(windows) - 1, min(keep, len(windows))).round().long()]
    return records, windows
