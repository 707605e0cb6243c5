"""Instruction following as a likelihood: NLL of the reference answers of held-out instruction records.

Protocol of :func:`instruction_nll`:

* Each record is rendered as the model sees it (:func:`gqaprune.data.instructions.render`: the chat
  template when the tokenizer has one, else the Alpaca format) and encoded as prompt ids + answer ids,
  cut to ``max_length`` tokens (:func:`gqaprune.data.instructions.encode_record`); the answer includes
  its end marker (end-of-turn / EOS), so a model that cannot stop pays for it.
* Batches of ``batch_size`` records are right padded with an attention mask; the logits at position
  ``t`` predict token ``t + 1`` and only answer tokens are scored. Cross-entropy in float32 on the
  answer positions only (the LM head runs on those rows alone), sums in float64.
* ``nll`` = total answer NLL / total answer tokens (nats per answer token, every token weighs the
  same). ``se`` is its standard error over records, treating records as independent draws of
  (sum, tokens) pairs (the ratio estimator's): ``sqrt(n / (n - 1) * sum_i (s_i - nll * t_i)^2) / sum_i t_i``;
  NaN for fewer than two records.
* On N ranks each rank scores a contiguous share of the batches (in lock-step when FSDP2-sharded) and
  the per-record float64 sums are added over the ranks, so every rank returns the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from gqaprune.data.instructions import encode_record
from gqaprune.errors import InputError
from gqaprune.models.modules import decoder_and_head
from gqaprune.runtime.distributed import DistContext, single_process
from gqaprune.runtime.placement import is_sharded, no_grad_mode

__all__ = ["instruction_nll"]


def _batch_nll(model, split, ids: list[list[int]], n_prompt: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-record answer NLL sums and answer token counts (float64 ``[b]`` each) of one batch."""
    width = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), width, dtype=torch.long)  # pad id 0: masked out, never scored
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    scored = torch.zeros(len(ids), width, dtype=torch.bool)  # positions whose *token* is an answer token
    for r, (x, p) in enumerate(zip(ids, n_prompt, strict=True)):
        input_ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(x)] = 1
        scored[r, max(p, 1):len(x)] = True  # token 0 has no context to be predicted from
    input_ids, mask, scored = input_ids.to(device), mask.to(device), scored.to(device)
    pick = scored[:, 1:]  # [b, T-1]: logits at t predict token t + 1
    targets = input_ids[:, 1:][pick]  # [m]
    rows = torch.arange(len(ids), device=device).unsqueeze(1).expand_as(pick)[pick]  # [m] record of each
    if split is None:
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1][pick]  # [m, V]
    else:
        decoder, head = split
        hidden = decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][pick])  # [m, V]: the head on answer rows only
    nll = F.cross_entropy(logits.float(), targets, reduction="none").double()  # [m]
    sums = torch.zeros(len(ids), dtype=torch.float64, device=device).index_add_(0, rows, nll)
    counts = pick.sum(1).double()
    return sums, counts


def instruction_nll(model, tokenizer, records: Sequence[Mapping[str, str]], max_length: int = 256,
                    batch_size: int = 8, ctx: DistContext | None = None) -> dict:
    """Mean NLL (nats per answer token) of the records' reference answers given their prompts.

    Args:
        model: a HF causal LM (replicated, or FSDP2-sharded on N ranks); eval mode for the call.
        tokenizer: its tokenizer (chat template used when present).
        records: ``{"instruction", "input", "output"}`` records (the held-out split).
        max_length: longest prompt + answer, in tokens (cut rule: :func:`gqaprune.data.instructions.encode_record`).
        batch_size: records per forward pass.
        ctx: default one process; on N ranks the records are split and the sums added.

    Returns:
        ``{"nll", "se", "records", "tokens", "truncated"}``: ``records`` scored, answer ``tokens``
        scored, ``truncated`` records cut to ``max_length``.
    """
    if not records:
        raise InputError("instruction_nll got no records; give the held-out instruction records")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    ctx = ctx or single_process()
    encoded = [encode_record(tokenizer, r, max_length) for r in records]
    n = len(encoded)
    # longest first, so a batch holds records of similar lengths (the padding costs as much as the tokens);
    # every rank uses the same order, and each record's NLL does not depend on its batch mates
    order = torch.tensor(sorted(range(n), key=lambda i: (-len(encoded[i][0]), i)), dtype=torch.long)  # [n]
    emb = model.get_input_embeddings()
    device = emb.weight.device if emb is not None else next(model.parameters()).device
    sharded = is_sharded(model)
    split = None if sharded else decoder_and_head(model)  # a sharded head belongs to the root's forward
    sums = torch.zeros(n, dtype=torch.float64)  # [n] answer NLL sum per record
    counts = torch.zeros(n, dtype=torch.float64)  # [n] answer tokens per record
    was_training = model.training
    model.eval()
    try:
        with no_grad_mode(ctx):
            for rows, active in ctx.batches(n, batch_size, lockstep=sharded):
                batch = [encoded[i] for i in order[rows]]
                s, c = _batch_nll(model, split, [b[0] for b in batch], [b[1] for b in batch], device)
                if active:
                    sums[order[rows]], counts[order[rows]] = s.cpu(), c.cpu()
    finally:
        model.train(was_training)
    ctx.all_reduce_([sums, counts])  # disjoint shares: the sum is every record's value
    total, tokens = float(sums.sum()), float(counts.sum())
    if tokens == 0:
        raise InputError("no answer token left to score; raise max_length or give records with outputs")
    nll = total / tokens
    k = int((counts > 0).sum())
    se = math.sqrt(k / (k - 1) * float(((sums - nll * counts) ** 2).sum())) / tokens if k > 1 else float("nan")
    return {"nll": nll, "se": se, "records": k, "tokens": int(tokens), "truncated": sum(e[2] for e in encoded)}
