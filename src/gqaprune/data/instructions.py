"""Instruction records as the model sees them: the chat template or the Alpaca format, and the held-out split.

A record is ``{"instruction", "input", "output"}`` (:func:`gqaprune.data.sources.load_instructions`).

Rendering (:func:`render`) gives ``(prompt, answer)`` texts, where ``prompt + answer`` is the whole
exchange and ``answer`` is everything the model must produce, its end marker included:

* with a chat template (``tokenizer.chat_template``): one user message, ``instruction`` or
  ``instruction + "\\n\\n" + input`` when ``input`` is non-empty; ``prompt`` is the template with
  ``add_generation_prompt=True``, ``answer`` the rest of the template rendered with the assistant
  message ``output`` (its end-of-turn tokens, e.g. ``<|im_end|>\\n``, included). The template's texts
  contain their special tokens (BOS included), so they are encoded with ``add_special_tokens=False``.
* without one: the Alpaca prompt (:data:`PROMPT_WITH_INPUT` / :data:`PROMPT_NO_INPUT`, up to and
  including ``"### Response:\\n"``) and ``output`` followed by the EOS token's text; the prompt is
  encoded with the tokenizer's default special tokens (a LLaMA-style BOS), the answer without.

:func:`encode_prompt` applies that rule and :func:`encode_record` gives the token ids of a whole
record, cut to ``max_length``: the answer from the right, the prompt from the left, so that a prompt
keeps at least ``max_length // 2`` tokens (or all of its own) and the answer the rest.
:func:`user_prompt` is the prompt of a bare user message (what
:func:`gqaprune.evaluation.generate.greedy_generate` uses with ``chat=True``).

Held-out split (:func:`split_records`): the ``n_heldout`` records whose content hash (SHA-256 of
instruction, input and output) is smallest are held out; every record equal in content to a held-out
one is kept out of training too. The rule depends on the records' content only (not their order or
a seed), so adding records moves only the records it must; no calibration or fine-tuning step may
read the held-out part.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from gqaprune.config.corpora import get_corpus
from gqaprune.errors import InputError

__all__ = ["PROMPT_NO_INPUT", "PROMPT_WITH_INPUT", "encode_prompt", "encode_record", "format_prompt",
           "has_chat_template", "instruction_records", "instruction_text", "record_key", "render", "split_records",
           "user_message", "user_prompt"]

# The Alpaca prompt format (copied from gqaprune.recovery.lora, whose imports will move here)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def _instruction(record: Mapping[str, str]) -> str:
    try:
        return record["instruction"]
    except KeyError:
        raise InputError(f"instruction record has no 'instruction': {dict(record)!r}") from None


def format_prompt(record: Mapping[str, str]) -> str:
    """The Alpaca prompt of a record, up to and including ``"### Response:\\n"``."""
    instruction = _instruction(record)
    extra = record.get("input") or ""
    if extra.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def has_chat_template(tokenizer) -> bool:
    """True when the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def user_message(record: Mapping[str, str]) -> str:
    """The user turn of a record: the instruction, then ``"\\n\\n"`` and the input when there is one."""
    instruction = _instruction(record)
    extra = record.get("input") or ""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def user_prompt(tokenizer, message: str) -> tuple[str, bool]:
    """``(text, templated)``: ``message`` as one user turn through the chat template (with the generation
    prompt) when the tokenizer has one (``templated`` True), else ``message`` itself."""
    if not has_chat_template(tokenizer):
        return message, False
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    return text, True


def encode_prompt(tokenizer, text: str, templated: bool) -> list[int]:
    """Token ids of a prompt: a templated text already holds its special tokens; a raw one gets the defaults."""
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def render(tokenizer, record: Mapping[str, str]) -> tuple[str, str]:
    """``(prompt, answer)`` texts of a record as the model sees it (rules: module docstring)."""
    output = record.get("output")
    if output is None:
        raise InputError(f"instruction record has no 'output': {dict(record)!r}")
    if not has_chat_template(tokenizer):
        return format_prompt(record), output + (tokenizer.eos_token or "")
    messages = [{"role": "user", "content": user_message(record)}]
    prompt, _ = user_prompt(tokenizer, messages[0]["content"])
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": output}], tokenize=False)
    if not full.startswith(prompt):  # a template that rewrites earlier turns: fall back to output + EOS
        return prompt, output + (tokenizer.eos_token or "")
    return prompt, full[len(prompt):]


def encode_record(tokenizer, record: Mapping[str, str], max_length: int) -> tuple[list[int], int, bool]:
    """``(ids, n_prompt, truncated)``: prompt then answer token ids of a rendered record (at most
    ``max_length``), how many of them are the prompt's, and whether anything was cut (module docstring)."""
    if max_length < 2:
        raise InputError(f"max_length must be >= 2 (a prompt token and an answer token), got {max_length}")
    prompt, answer = render(tokenizer, record)
    p_ids = encode_prompt(tokenizer, prompt, has_chat_template(tokenizer))
    a_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    n_answer = min(len(a_ids), max_length - min(len(p_ids), max_length // 2))
    n_prompt = min(len(p_ids), max_length - n_answer)
    truncated = n_answer < len(a_ids) or n_prompt < len(p_ids)
    return p_ids[len(p_ids) - n_prompt:] + a_ids[:n_answer], n_prompt, truncated


def record_key(record: Mapping[str, str]) -> str:
    """SHA-256 (hex) of a record's instruction, input and output: its identity for the held-out split."""
    parts = (record.get("instruction") or "", record.get("input") or "", record.get("output") or "")
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def split_records(records: Sequence[Mapping[str, str]], n_heldout: int) -> tuple[list, list]:
    """``(training, held_out)``: the ``n_heldout`` records of smallest :func:`record_key` are held out
    (ties by position); training is every other record whose content differs from all held-out ones.
    Both keep the records' order."""
    if not 0 <= n_heldout <= len(records):
        raise InputError(f"n_heldout must be in 0..{len(records)} (the records available), got {n_heldout}")
    keys = [record_key(r) for r in records]
    chosen = set(sorted(range(len(records)), key=lambda i: (keys[i], i))[:n_heldout])
    held_keys = {keys[i] for i in chosen}
    training = [r for i, r in enumerate(records) if i not in chosen and keys[i] not in held_keys]
    held_out = [r for i, r in enumerate(records) if i in chosen]
    return training, held_out


def instruction_records(name: str, part: str, data_dir=None) -> list[dict]:
    """The records of instruction corpus ``name``: ``part`` ``"train"`` (what calibration and recovery may read)
    or ``"heldout"`` (the corpus' ``heldout_records`` records the evaluate stages score)."""
    from gqaprune.data.sources import load_instructions

    if part not in ("train", "heldout"):
        raise ValueError(f"part must be 'train' or 'heldout', got {part!r}")
    corpus = get_corpus(name)
    records = load_instructions(name, "train", data_dir=data_dir)
    training, held = split_records(records, min(corpus.heldout_records, len(records)))
    return training if part == "train" else held


def instruction_text(tokenizer, records: Sequence[Mapping[str, str]]) -> tuple[str, bool]:
    """``(text, templated)``: the records rendered as whole exchanges (prompt + answer, end markers included),
    joined by ``"\\n"``; ``templated`` when the text holds the chat template's special tokens already (then
    it is tokenised without adding more)."""
    return "\n".join(prompt + answer for prompt, answer in (render(tokenizer, r) for r in records)), \
        has_chat_template(tokenizer)
