"""The one greedy generator behind every generation metric (HumanEval, generation health).

Protocol of :func:`greedy_generate`:

* Prompts: raw text encoded with the tokenizer's default special tokens, or with ``chat=True`` one user
  message through the tokenizer's chat template (generation prompt added, encoded without extra
  special tokens; a tokenizer without a template gets the raw prompt):
  :func:`gqaprune.data.instructions.user_prompt`.
* Batches of ``batch_size`` prompts, grouped by length (longest first) to waste little padding, left
  padded (pad id: the tokenizer's pad token, else EOS, else 0; the tokenizer is not modified) with
  an attention mask, so every row's last prompt token sits at the same position and new tokens follow it.
* ``model.generate`` with ``do_sample=False, num_beams=1`` and the KV cache: the argmax token at each
  step, whatever the checkpoint's own generation settings (its ``generation_config`` is set aside for
  the call, so a shipped ``repetition_penalty`` cannot change the protocol); a row ends at an EOS id
  (the model's generation config's and the tokenizer's, all of them) or once its continuation holds
  a stop string; the batch ends when every row has ended or after ``max_new_tokens`` new tokens.
* Text: prompt + new tokens (up to the first EOS) are decoded with special tokens skipped and the
  decoded prompt is removed from the front (decoding the new tokens alone would lose the leading space
  SentencePiece tokenizers strip from a first token); the text is cut before its first stop string.

Greedy decoding is deterministic; a row's text does not depend on the other rows of its batch beyond
float rounding (padding changes the shapes of the matrix products, rarely a near-tied argmax).
On N ranks each rank generates a contiguous share of the prompts and every rank returns all texts, in
the prompts' order. Generation needs the whole model on every rank (``distributed.placement:
replicate``): FSDP2-sharded ranks would have to run each step's forward in lock-step, with rows ending
at different steps, which this does not do; a sharded model is refused.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from gqaprune.data.instructions import encode_prompt, user_prompt
from gqaprune.errors import InputError
from gqaprune.runtime.distributed import DistContext, single_process
from gqaprune.runtime.placement import is_sharded

__all__ = ["cut_at_stop", "eos_token_ids", "generation_batch", "greedy_generate", "prompt_ids"]


class _StopStrings(StoppingCriteria):
    """Ends a row once the text of its new tokens holds a stop string.

    Only the last ``window`` new tokens are decoded each step (a stop string of L characters ends in the
    newest token and spans at most L tokens); the exact cut happens on the whole text afterwards.
    """

    def __init__(self, tokenizer, stop: Sequence[str], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, tuple(stop), prompt_len
        self.window = max(len(s) for s in self.stop) + 4

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        tails = input_ids[:, self.prompt_len:][:, -self.window:].tolist()  # [b, <= window]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a sequence: the model's generation config EOS (one or several) and the tokenizer's."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    found = getattr(config, "eos_token_id", None)
    for value in ([found] if isinstance(found, int) else list(found or [])) + [tokenizer.eos_token_id]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of one prompt as :func:`greedy_generate` feeds it (raw, or one chat user turn with ``chat``)."""
    text, templated = user_prompt(tokenizer, prompt) if chat else (prompt, False)
    ids = encode_prompt(tokenizer, text, templated)
    if not ids:
        raise InputError(f"prompt {prompt[:40]!r} encodes to no tokens; give a non-empty prompt")
    return ids


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


#: most rows of one generation batch that :func:`generation_batch` picks on its own
WIDEST_BATCH = 32


def generation_batch(batch_size: int, n_prompts: int) -> int:
    """Rows per greedy batch: at least ``batch_size``, up to :data:`WIDEST_BATCH` when there are that many
    prompts. A decoding step costs about as much for 32 rows as for 8 (it is bound by per-layer overheads, not
    arithmetic, on a CPU and a GPU alike), and the cache of 32 rows of a few hundred tokens is small (an 8B
    GQA model: ~2.5 GB at 600 tokens)."""
    return max(batch_size, min(n_prompts, WIDEST_BATCH))


def _device(model) -> torch.device:
    emb = model.get_input_embeddings()
    return emb.weight.device if emb is not None else next(model.parameters()).device


def _decode(tokenizer, prompt: list[int], new: list[int], eos: set[int]) -> str:
    """Continuation text of one row: new tokens up to the first EOS, decoded in the prompt's context."""
    end = next((i for i, t in enumerate(new) if t in eos), len(new))
    full = tokenizer.decode(prompt + new[:end], skip_special_tokens=True)
    head = tokenizer.decode(prompt, skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head):]
    return tokenizer.decode(new[:end], skip_special_tokens=True)


def _generate_batch(model, tokenizer, batch: list[list[int]], config: GenerationConfig, stop: Sequence[str],
                    eos: set[int]) -> list[str]:
    """Greedy continuations of one batch of encoded prompts (left padded)."""
    width = max(len(ids) for ids in batch)
    pad = config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], dtype=torch.long)  # [b, T]
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=torch.long)
    device = _device(model)
    criteria = StoppingCriteriaList([_StopStrings(tokenizer, stop, width)]) if stop else None
    out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config,
                         stopping_criteria=criteria)  # [b, T + new]
    new = out[:, width:].tolist()
    return [cut_at_stop(_decode(tokenizer, ids, row, eos), stop) for ids, row in zip(batch, new, strict=True)]


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
                    stop: Sequence[str] = (), ctx: DistContext | None = None, chat: bool | Sequence[bool] = False,
                    desc: str = "generate", progress: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (protocol: module docstring), in the prompts' order.

    Args:
        model: a HF causal LM (plain or a pruned checkpoint with per-layer shapes), replicated on
            every rank; eval mode for the call (its training flag is restored).
        tokenizer: its tokenizer (not modified).
        prompts: the prompt texts.
        max_new_tokens: at most this many new tokens per prompt.
        batch_size: prompts per ``generate`` call.
        stop: strings that end a continuation; the returned text stops before the first of them.
        ctx: default one process; on N ranks the prompts are split and every rank returns all texts.
        chat: render each prompt as a user message through the chat template (when there is one); one flag
            for all prompts or one per prompt.
        desc, progress: the progress bar (main rank only).

    Returns:
        The generated text of each prompt (prompt not included).
    """
    ctx = ctx or single_process()
    if is_sharded(model):
        raise InputError("generation needs the whole model on every rank; set distributed.placement: replicate "
                         "for the evaluate stages (FSDP2-sharded models cannot generate here)")
    if max_new_tokens < 1 or batch_size < 1:
        raise InputError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=eos or None, pad_token_id=pad)
    mine = list(ctx.shard(len(prompts)))
    flags = [chat] * len(prompts) if isinstance(chat, bool) else list(chat)
    if len(flags) != len(prompts):
        raise InputError(f"got {len(flags)} chat flags for {len(prompts)} prompts")
    encoded = {i: prompt_ids(tokenizer, prompts[i], flags[i]) for i in mine}
    order = sorted(mine, key=lambda i: -len(encoded[i]))  # similar lengths together: less padding
    texts: dict[int, str] = {}
    was_training, own_config = model.training, model.generation_config
    model.eval()
    # generate() fills every unset option from model.generation_config (a checkpoint's repetition_penalty,
    # no_repeat_ngram_size...): with ours in its place only library defaults fill in, so greedy stays greedy
    model.generation_config = config
    try:
        with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="prompt",
                                          disable=not (progress and ctx.is_main)) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                outs = _generate_batch(model, tokenizer, [encoded[i] for i in rows], config, stop, set(eos))
                texts.update(zip(rows, outs, strict=True))
                bar.update(len(rows))
    finally:
        model.train(was_training)
        model.generation_config = own_config
    local = [texts[i] for i in mine]
    return [t for part in ctx.all_gather_object(local) for t in part]  # shares are contiguous, in rank order
