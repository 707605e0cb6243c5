"""Perplexity evaluation with LLM-Pruner's protocol.

Protocol (see also :mod:`gqaprune.data.windows`):

* Text: all rows of the corpus' evaluation split (:attr:`gqaprune.config.corpora.Corpus.evaluation_split`:
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

Windows over the whole split (``spread=True``): instead of the first ``max_tokens // seq_len``
windows, ``n = max_tokens // seq_len`` windows are taken evenly spread over all the split's full
windows (:func:`spread_windows`: indices ``round(linspace(0, n_full - 1, n))`` of the same
non-overlapping grid), so a capped evaluation samples every article, and all windows is the full
evaluation. Each window's NLL is kept (:attr:`PerplexityResult.window_nll`), so the standard error
of the log-perplexity (mean over windows of the per-window mean NLL) is
``std(window means, ddof=1) / sqrt(n)`` (:attr:`PerplexityResult.log_ppl_se`); it treats windows as
independent draws (neighbouring windows of one article are not quite, so it is a lower bound).

Speed: the logits are never materialised as ``[batch, seq_len, vocab]`` float32: the decoder
returns final hidden states and the LM head + cross-entropy run on ``head_chunk`` rows at a time
(:func:`window_nlls`); the result equals the full-logits path to float32 rounding. The per-window
values stay on the device until the end (one host sync per corpus). On N ranks (``ctx``) each rank
evaluates a contiguous share of the windows and the values are summed over the ranks.
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

from gqaprune.config.corpora import CORPORA, evaluation_corpora
from gqaprune.data.windows import clear_token_cache, corpus_token_ids
from gqaprune.models.modules import decoder_and_head
from gqaprune.runtime.distributed import DistContext, single_process
from gqaprune.runtime.placement import is_sharded, no_grad_mode

__all__ = ["PPLMetric", "PerplexityResult", "clear_token_cache", "perplexities", "perplexity", "window_nlls"]



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
        spread: True when the windows were spread evenly over the split (else the first ones).
        window_nll: mean NLL (nats) of each evaluated window, in window order.
    """

    dataset: str
    split: str
    ppl: float
    n_tokens: int
    n_windows: int
    seq_len: int
    capped: bool
    spread: bool = False
    window_nll: tuple[float, ...] = ()

    @property
    def log_ppl(self) -> float:
        """ln(ppl): the mean over windows of the per-window mean NLL."""
        return math.log(self.ppl)

    @property
    def log_ppl_se(self) -> float:
        """Standard error of :attr:`log_ppl` over windows (nan with fewer than 2 windows)."""
        n = len(self.window_nll)
        if n < 2:
            return float("nan")
        mean = sum(self.window_nll) / n
        var = sum((x - mean) ** 2 for x in self.window_nll) / (n - 1)
        return math.sqrt(var / n)


def _input_device(model) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device  # right even for a model dispatched over devices
    return next(model.parameters()).device


def spread_windows(n_full: int, n_windows: int) -> torch.Tensor:
    """Indices of ``n_windows`` of ``n_full`` grid windows, evenly spread (first and last included)."""
    if n_windows >= n_full:
        return torch.arange(n_full)
    if n_windows == 1:
        return torch.zeros(1, dtype=torch.long)
    idx = torch.linspace(0, n_full - 1, n_windows, dtype=torch.float64).round().long()
    return torch.unique(idx)  # strictly increasing: n_windows < n_full keeps them distinct


def eval_windows(ids: torch.Tensor, seq_len: int, max_tokens: int | None = None, spread: bool = False
                 ) -> tuple[torch.Tensor, int]:
    """The evaluated windows ``[n, seq_len]`` of a token stream and the number of full windows.

    ``max_tokens`` keeps ``max_tokens // seq_len`` windows: the first ones, or evenly spread over the
    whole stream with ``spread``; None keeps them all.
    """
    n_full = ids.numel() // seq_len
    grid = ids[: n_full * seq_len].view(n_full, seq_len)
    if max_tokens is None:
        return grid, n_full
    n = min(n_full, max_tokens // seq_len)
    if spread:
        return grid[spread_windows(n_full, n)], n_full
    return grid[:n], n_full


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
    spread: bool = False,
    head_chunk: int = 1024,
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
        spread: with ``max_tokens``, take the windows evenly spread over the whole split instead of
            the first ones (:func:`spread_windows`).
        head_chunk: rows of the LM head + cross-entropy computed at once (:func:`window_nlls`).

    Returns:
        :class:`PerplexityResult`.
    """
    split = CORPORA[dataset].evaluation_split if dataset in CORPORA else None
    if not split:
        raise ValueError(f"unknown evaluation dataset {dataset!r}; known: {evaluation_corpora()}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a window must predict at least one token), got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ctx = ctx or single_process()
    with ctx.main_first():  # the main rank fills a download cache first
        ids = corpus_token_ids(tokenizer, dataset, split, data_dir=data_dir)  # [n_tokens_total], cached

    n_full = ids.numel() // seq_len  # full windows; the partial tail is dropped
    if n_full == 0:
        raise ValueError(f"{dataset} {split!r} has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    if max_tokens is not None and max_tokens < seq_len:
        raise ValueError(f"max_tokens={max_tokens} is smaller than one window (seq_len={seq_len})")
    windows, _ = eval_windows(ids, seq_len, max_tokens, spread)  # [n_windows, seq_len]
    n_windows = windows.shape[0]
    nll = window_nlls(model, windows, batch_size, device, ctx, head_chunk=head_chunk, desc=f"ppl {dataset}")
    return PerplexityResult(
        dataset=dataset,
        split=split,
        ppl=math.exp(float(nll.mean())),
        n_tokens=n_windows * seq_len,
        n_windows=n_windows,
        seq_len=seq_len,
        capped=n_windows < n_full,
        spread=bool(spread and n_windows < n_full),
        window_nll=tuple(nll.tolist()),
    )


def window_nlls(model, windows: torch.Tensor, batch_size: int = 8, device: str | torch.device | None = None,
                ctx: DistContext | None = None, head_chunk: int = 1024, desc: str = "ppl",
                progress: bool = True) -> torch.Tensor:
    """Mean next-token NLL (nats, float64, on the CPU) of each window ``[n, seq_len] -> [n]``.

    Runs the decoder for final hidden states and applies the LM head and cross-entropy ``head_chunk``
    rows at a time (float32 logits), so no ``[batch, seq_len, vocab]`` tensor is built; a model that
    cannot be split into decoder + head (or one sharded by FSDP2, whose head belongs to the root's
    forward) goes through ``.logits``. Eval mode for the call (the training flag is restored).
    ``ctx``: on N ranks each rank runs a contiguous share of the batches (in lock-step when the model
    is sharded) and every rank returns all the windows' values.
    """
    ctx = ctx or single_process()
    device = _input_device(model) if device is None else torch.device(device)
    split = None if is_sharded(model) else decoder_and_head(model)
    n, seq_len = windows.shape
    out = torch.zeros(n, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        with no_grad_mode(ctx), tqdm(total=n, desc=desc, unit="win", disable=not (progress and ctx.is_main)) as bar:
            for rows, active in ctx.batches(n, batch_size, lockstep=is_sharded(model)):
                batch = windows[rows].to(device, non_blocking=True)  # [b, T]
                if split is None:
                    hidden = model(input_ids=batch, use_cache=False).logits[:, :-1]  # [b, T-1, V]
                    head = None
                else:
                    decoder, head = split
                    hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]  # [b, T-1, H]
                if active:
                    out[rows] = _mean_nll(hidden, head, batch[:, 1:].to(hidden.device), head_chunk).to(device)
                    bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    ctx.all_reduce_(out)  # disjoint shares: the sum is every window's value
    return out.cpu()


def _mean_nll(hidden: torch.Tensor, head, labels: torch.Tensor, head_chunk: int) -> torch.Tensor:
    """Mean next-token NLL (float64) per window from final hidden states [b, T-1, H] (or logits when
    ``head`` is None) and labels [b, T-1]; the head and the float32 cross-entropy run ``head_chunk`` rows
    at a time."""
    b, t = labels.shape
    rows = hidden.reshape(b * t, -1)
    flat = labels.reshape(-1)
    nll = torch.empty(b * t, dtype=torch.float32, device=hidden.device)
    for r in range(0, rows.shape[0], head_chunk):
        chunk = rows[r : r + head_chunk]
        logits = (chunk if head is None else head(chunk)).float()  # [chunk, V]
        nll[r : r + head_chunk] = F.cross_entropy(logits, flat[r : r + head_chunk], reduction="none")
    return nll.view(b, t).double().mean(1)


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
                 ctx: DistContext | None = None, spread: bool = False) -> dict[str, dict]:
    """``{dataset: {"ppl", "log_ppl_se", "tokens", "windows", "capped", "spread", "split"}}`` for each corpus,
    rounded for the metrics files (``ctx``, ``spread``: as :func:`perplexity`)."""
    import logging

    log = logging.getLogger("gqaprune")
    out = {}
    for name in datasets:
        r = perplexity(model, tokenizer, dataset=name, seq_len=seq_len, batch_size=batch_size,
                       max_tokens=max_tokens, data_dir=data_dir, ctx=ctx, spread=spread)
        out[name] = {"ppl": round(r.ppl, 4), "log_ppl_se": round(r.log_ppl_se, 5), "tokens": r.n_tokens,
                     "windows": r.n_windows, "capped": r.capped, "spread": r.spread, "split": r.split}
        log.info("%s/%s: ppl %.3f over %d tokens%s", name, r.split, r.ppl, r.n_tokens, " (capped)" if r.capped else "")
    return out
