"""Perplexity evaluation with LLM-Pruner's protocol.

Protocol (see also :mod:`gqaprune.data`):

* Text: all rows of the corpus' evaluation split (:data:`gqaprune.data.EVALUATION_SPLIT`:
  wikitext2 -> ``test``, ptb -> ``test``, c4 -> ``validation`` half of the local C4 subset),
  joined with ``"\\n\\n"`` and tokenised once with the tokenizer's default special tokens (a BOS,
  if the tokenizer adds one, appears only at token 0 of the stream).
* Windows: the stream is cut into ``n_windows = n_tokens // seq_len`` non-overlapping windows of
  ``seq_len`` tokens starting at token 0; the final partial window is dropped. ``max_tokens``
  keeps only the first ``max_tokens // seq_len`` windows.
* Loss: each window is fed on its own (no context carried over); the logits at positions
  ``0..seq_len-2`` predict tokens ``1..seq_len-1`` (labels = inputs shifted by one, as HF does), so a
  window contributes ``seq_len - 1`` token negative log-likelihoods (nats).
* PPL = ``exp(mean NLL over all predicted tokens of all windows)``, i.e. LLM-Pruner's
  ``exp(cat(nlls).mean())``. As every window has the same length this also equals
  ``exp(mean over windows of the per-window mean loss)``. Sums are accumulated in float64, the
  cross-entropy is computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gqaprune import data

from .distributed import DistContext, single_process
from .placement import is_sharded, no_grad_mode

__all__ = ["PPLMetric", "PerplexityResult", "clear_token_cache", "perplexities", "perplexity", "window_nlls"]

# (tokenizer fingerprint, dataset, split, data dir) -> token ids [n_tokens] (torch.long, CPU)
_TOKEN_CACHE: dict[tuple, torch.Tensor] = {}
_PROBE = "The quick brown fox, 1234 \n\n= Héllo =\n"  # tells tokenizers with equal name/size apart


@dataclass(frozen=True)
class PerplexityResult:
    """Result of :func:`perplexity`.

    Attributes:
        dataset: corpus name (``wikitext2``, ``ptb``, ``c4``).
        split: the split evaluated.
        ppl: perplexity, ``exp`` of the mean per-token NLL (nats).
        n_tokens: input tokens in the evaluated windows, ``n_windows * seq_len``; the number of
            predicted tokens averaged over is ``n_windows * (seq_len - 1)``.
        n_windows: number of windows evaluated.
        seq_len: window length in tokens.
        capped: True when ``max_tokens`` left out some of the full windows.
        log_ppl_se: standard error of the log-perplexity (the mean NLL) over windows: the standard
            deviation of the per-window mean NLL / sqrt(n_windows); NaN for one window.
    """

    dataset: str
    split: str
    ppl: float
    n_tokens: int
    n_windows: int
    seq_len: int
    capped: bool
    log_ppl_se: float = float("nan")


def _tokenizer_key(tokenizer) -> tuple:
    probe = tuple(tokenizer(_PROBE, add_special_tokens=True)["input_ids"])
    return (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer), probe)


def clear_token_cache() -> None:
    """Forget all cached tokenised evaluation texts."""
    _TOKEN_CACHE.clear()


def _eval_token_ids(tokenizer, dataset: str, split: str, data_dir) -> torch.Tensor:
    """Token ids ``[n_tokens]`` of the joined evaluation text, cached in-process."""
    root = data.resolve_data_dir(data_dir)
    key = (_tokenizer_key(tokenizer), dataset, split, None if root is None else str(root))
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = data.corpus_token_ids(tokenizer, dataset, split, data_dir=data_dir)
    return _TOKEN_CACHE[key]


def _input_device(model) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device  # right even for a model dispatched over devices
    return next(model.parameters()).device


def perplexity(
    model,
    tokenizer,
    dataset: str = "wikitext2",
    seq_len: int = 128,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str | torch.device | None = None,
    data_dir: str | os.PathLike | None = None,
    ctx: DistContext | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on a corpus' evaluation split (protocol: module docstring).

    Args:
        model: a causal LM returning ``.logits`` ``[batch, seq_len, vocab]`` for ``input_ids``.
            It is put in eval mode for the call and its training flag restored afterwards.
        tokenizer: the model's tokenizer (tokenised texts are cached per tokenizer and dataset).
        dataset: ``wikitext2``, ``ptb`` or ``c4``; the split is ``EVALUATION_SPLIT[dataset]``.
        seq_len: window length in tokens (>= 2).
        batch_size: windows per forward pass.
        max_tokens: evaluate only the first ``max_tokens // seq_len`` windows (whole windows only);
            ``None`` evaluates all of them.
        device: where input ids are sent; default the device of the model's input embeddings. The
            model itself is not moved.
        data_dir: local mirror directory (else ``$GQAPRUNE_DATA_DIR``, else the hub).
        ctx: default one process; on N ranks (replicated or FSDP2-sharded model) the windows are
            split over the ranks and every rank returns the same result.

    Returns:
        :class:`PerplexityResult`.
    """
    if dataset not in data.EVALUATION_SPLIT:
        raise ValueError(f"unknown evaluation dataset {dataset!r}; known: {sorted(data.EVALUATION_SPLIT)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a window must predict at least one token), got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    split = data.EVALUATION_SPLIT[dataset]
    ctx = ctx or single_process()
    with ctx.main_first():  # the main rank fills a download cache first
        ids = _eval_token_ids(tokenizer, dataset, split, data_dir)  # [n_tokens_total]

    n_full = ids.numel() // seq_len  # full windows; the partial tail is dropped
    if n_full == 0:
        raise ValueError(f"{dataset} {split!r} has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    n_windows = n_full
    if max_tokens is not None:
        if max_tokens < seq_len:
            raise ValueError(f"max_tokens={max_tokens} is smaller than one window (seq_len={seq_len})")
        n_windows = min(n_full, max_tokens // seq_len)
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)  # [n_windows, seq_len]
    window_nll = window_nlls(model, windows, batch_size, device, ctx, desc=f"ppl {dataset}")

    per_window = (window_nll / (seq_len - 1)).cpu()  # mean NLL per window; the only host sync
    mean = float(per_window.mean())
    se = float(per_window.std() / math.sqrt(n_windows)) if n_windows > 1 else float("nan")
    return PerplexityResult(
        dataset=dataset,
        split=split,
        ppl=math.exp(mean),
        n_tokens=n_windows * seq_len,
        n_windows=n_windows,
        seq_len=seq_len,
        capped=n_windows < n_full,
        log_ppl_se=se,
    )


def window_nlls(model, windows: torch.Tensor, batch_size: int = 8, device: str | torch.device | None = None,
                ctx: DistContext | None = None, desc: str = "ppl", progress: bool = True) -> torch.Tensor:
    """Summed next-token NLL (float64, nats) of each window ``[n, seq_len] -> [n]``, on the input device.

    Windows go through the model in batches of ``batch_size`` in eval mode (the training flag is
    restored); ``ctx``: on N ranks each rank runs a contiguous share of the batches (in lock-step when
    the model is sharded) and every rank returns all the windows' values.
    """
    ctx = ctx or single_process()
    device = _input_device(model) if device is None else torch.device(device)
    n = windows.shape[0]
    out = torch.zeros(n, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with no_grad_mode(ctx), tqdm(total=n, desc=desc, unit="win", disable=not (progress and ctx.is_main)) as bar:
            for rows, active in ctx.batches(n, batch_size, lockstep=is_sharded(model)):
                batch = windows[rows].to(device, non_blocking=True)  # [b, seq_len]
                logits = model(input_ids=batch, use_cache=False).logits  # [b, seq_len, vocab]
                if active:
                    out[rows] = _window_nll(logits, batch.to(logits.device))
                    bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    ctx.all_reduce_(out)  # disjoint shares: the sum is every window's value
    return out


def _window_nll(logits: torch.Tensor, ids: torch.Tensor, max_bytes: int = 1 << 30) -> torch.Tensor:
    """Summed next-token NLL (float64, nats) of each window: logits [b, seq, vocab], ids [b, seq] -> [b].

    The float32 log-softmax runs over groups of windows whose float32 copy of the logits stays under
    ``max_bytes``, so a large batch over a large vocabulary never materialises all of it at once.
    """
    b, seq, vocab = logits.shape
    rows = max(1, max_bytes // max(1, (seq - 1) * vocab * 4))
    out = torch.empty(b, dtype=torch.float64, device=logits.device)
    for i in range(0, b, rows):
        chunk = logits[i : i + rows, :-1].float()  # [r, seq - 1, vocab]
        nll = F.cross_entropy(chunk.reshape(-1, vocab), ids[i : i + rows, 1:].reshape(-1), reduction="none")
        out[i : i + rows] = nll.view(chunk.shape[0], seq - 1).double().sum(1)
    return out


class PPLMetric(dict):
    """Perplexities on several corpora, as a ``{dataset: ppl}`` dict (LLM-Pruner's API).

    ``PPLMetric(model, tokenizer, ["wikitext2", "ptb"])`` evaluates at construction and behaves
    like ``{"wikitext2": 58.9, "ptb": 91.2}``; ``.results`` maps each dataset to its full
    :class:`PerplexityResult`. Arguments are those of :func:`perplexity`; ``device="cuda"`` (the
    original's default) falls back to the model's device, with a warning, when CUDA is missing.
    """

    def __init__(
        self,
        model,
        tokenizer,
        datasets: Sequence[str] | str = ("wikitext2",),
        seq_len: int = 128,
        batch_size: int = 8,
        device: str | torch.device | None = "cuda",
        max_tokens: int | None = None,
        data_dir: str | os.PathLike | None = None,
    ):
        super().__init__()
        if isinstance(datasets, str):
            datasets = [datasets]
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            warnings.warn("CUDA is not available; evaluating on the model's device", stacklevel=2)
            device = None
        self.results: dict[str, PerplexityResult] = {}
        for name in datasets:
            result = perplexity(
                model,
                tokenizer,
                dataset=name,
                seq_len=seq_len,
                batch_size=batch_size,
                max_tokens=max_tokens,
                device=device,
                data_dir=data_dir,
            )
            self.results[name] = result
            self[name] = result.ppl


def perplexities(model, tokenizer, datasets: Sequence[str], seq_len: int = 128, batch_size: int = 8,
                 max_tokens: int | None = None, data_dir: str | os.PathLike | None = None,
                 ctx: DistContext | None = None) -> dict[str, dict]:
    """``{dataset: {"ppl", "tokens", "capped", "split"}}`` for each corpus, ppl rounded to 4 decimals
    (``ctx``: on N ranks, as :func:`perplexity`)."""
    import logging

    log = logging.getLogger("gqaprune")
    out = {}
    for name in datasets:
        r = perplexity(model, tokenizer, dataset=name, seq_len=seq_len, batch_size=batch_size,
                       max_tokens=max_tokens, data_dir=data_dir, ctx=ctx)
        out[name] = {"ppl": round(r.ppl, 4), "tokens": r.n_tokens, "capped": r.capped, "split": r.split}
        log.info("%s/%s: ppl %.3f over %d tokens%s", name, r.split, r.ppl, r.n_tokens, " (capped)" if r.capped else "")
    return out
