"""Instruction records: rendering (chat template or Alpaca), the held-out split, and the answer NLL."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gqaprune.data.instructions import (
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    encode_record,
    render,
    split_records,
)
from gqaprune.errors import InputError
from gqaprune.evaluation.instructions import instruction_nll
from gqaprune.models.random_models import build_model
from gqaprune.recovery import lora
from gqaprune.runtime.distributed import DistContext
from helpers import SAMPLE_TEXT, bpe_tokenizer

CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")

RECORDS = [
    {"instruction": "Name the primary colors.", "input": "", "output": "Red , blue and yellow ."},
    {"instruction": "Who is the actor?", "input": "Robert Boulter is an English film actor .",
     "output": "Robert Boulter ."},
    {"instruction": "Summarise.", "input": "the dow jones industrial average plunged N points",
     "output": "The Dow fell ."},
    {"instruction": "Say no.", "input": "  ", "output": "no"},
    {"instruction": "Describe the stock exchange in one long answer.", "input": "",
     "output": "the new york stock exchange did n't fall apart " * 8},
]


@pytest.fixture(scope="module")
def tokenizers():
    plain = bpe_tokenizer([SAMPLE_TEXT], 300, eos=True)
    chat = bpe_tokenizer([SAMPLE_TEXT], 300, eos=True)
    chat.chat_template = CHATML
    return plain, chat


@pytest.fixture(scope="module")
def model(tokenizers):
    tok = tokenizers[0]
    return build_model("tiny-llama-gqa4", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, dtype=torch.float64)


def test_alpaca_format_without_a_chat_template(tokenizers):
    plain, _ = tokenizers
    for record in RECORDS[:4]:
        prompt, answer = render(plain, record)
        assert prompt == (PROMPT_WITH_INPUT if (record.get("input") or "").strip() else PROMPT_NO_INPUT).format(
            instruction=record["instruction"], input=record.get("input") or "")
        assert answer == record["output"] + "</s>"
        ids = lora.encode_example(plain, record, 256)  # what LoRA trains on: the answer and its end marker
        n_prompt = sum(1 for x in ids["labels"] if x == lora.IGNORE_INDEX)
        assert plain.decode(ids["input_ids"][n_prompt:]) == answer
    assert "### Input:" not in render(plain, RECORDS[3])[0]  # a blank input is no input


def test_chat_template_render(tokenizers):
    _, chat = tokenizers
    prompt, answer = render(chat, RECORDS[1])
    assert prompt == "<s>user\nWho is the actor?\n\nRobert Boulter is an English film actor .</s>\n<s>assistant\n"
    assert answer == "Robert Boulter .</s>\n"
    assert render(chat, RECORDS[0])[0] == "<s>user\nName the primary colors.</s>\n<s>assistant\n"
    ids, n_prompt, cut = encode_record(chat, RECORDS[1], 256)
    assert ids[:n_prompt] == chat(prompt, add_special_tokens=False)["input_ids"]  # no second BOS
    assert ids[n_prompt:] == chat(answer, add_special_tokens=False)["input_ids"] and not cut
    assert chat.eos_token_id in ids[n_prompt:]
    with pytest.raises(InputError, match="output"):
        render(chat, {"instruction": "x"})


def test_encode_record_cuts_to_max_length(tokenizers):
    plain, _ = tokenizers
    full, n_prompt, cut = encode_record(plain, RECORDS[4], 10_000)
    assert not cut and full[0] == plain.bos_token_id  # a raw prompt gets the default BOS
    ids, p, cut = encode_record(plain, RECORDS[4], 64)
    assert cut and len(ids) == 64
    assert p == min(n_prompt, 32) and ids[:p] == full[n_prompt - p:n_prompt]  # prompt cut from the left
    assert ids[p:] == full[n_prompt:n_prompt + 64 - p]  # answer cut from the right


def test_split_is_deterministic_disjoint_and_order_free():
    records = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(50)]
    train, held = split_records(records, 10)
    assert len(held) == 10 and len(train) == 40
    assert split_records(records, 10) == (train, held)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    assert train == [r for r in records if r in train] and held == [r for r in records if r in held]  # file order
    train_rev, held_rev = split_records(records[::-1], 10)
    assert sorted(r["instruction"] for r in held_rev) == sorted(r["instruction"] for r in held)
    assert held != records[:10] and held != records[-10:]  # not simply the first or last records
    # a duplicate of a held-out record never reaches training
    dup_train, dup_held = split_records(records + [dict(held[0])], 10)
    assert held[0] not in dup_train and len(dup_held) == 10
    with pytest.raises(InputError):
        split_records(records, 51)


def _hand_nll(model, tok, records, max_length):
    total, tokens, per = 0.0, 0, []
    for record in records:
        ids, p, _ = encode_record(tok, record, max_length)
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        nll = [-float(logp[t - 1, ids[t]]) for t in range(max(p, 1), len(ids))]
        total, tokens = total + sum(nll), tokens + len(nll)
        per.append((sum(nll), len(nll)))
    mean = total / tokens
    n = len(per)
    se = math.sqrt(n / (n - 1) * sum((s - mean * t) ** 2 for s, t in per)) / tokens
    return mean, se, tokens


@pytest.mark.parametrize("which", [0, 1], ids=["alpaca", "chat"])
def test_instruction_nll_equals_a_hand_computation(model, tokenizers, which):
    tok = tokenizers[which]
    mean, se, tokens = _hand_nll(model, tok, RECORDS, 48)
    r = instruction_nll(model, tok, RECORDS, max_length=48, batch_size=3)
    # the library's cross-entropy runs in float32, the hand computation in float64
    assert r["nll"] == pytest.approx(mean, rel=1e-6) and r["se"] == pytest.approx(se, rel=1e-4)
    cut = sum(encode_record(tok, rec, 48)[2] for rec in RECORDS)
    assert (r["records"], r["tokens"], r["truncated"]) == (5, tokens, cut) and cut >= 1
    assert r["nll"] > 4.0  # a random model over 300 tokens: about ln(300) = 5.7 nats
    assert instruction_nll(model, tok, RECORDS, max_length=48, batch_size=1)["nll"] == pytest.approx(r["nll"], rel=1e-9)


class _TwoRanks(DistContext):
    """Rank ``rank`` of a pretend 2-rank job whose sums add the other rank's stored tensors."""

    def __init__(self, rank: int, store: dict):
        super().__init__(rank=rank, world_size=2)
        object.__setattr__(self, "store", store)

    def all_reduce_(self, tensors, op: str = "sum") -> None:
        self.store[self.rank] = [t.clone() for t in tensors]
        other = self.store.get(1 - self.rank)
        for t, o in zip(tensors, other or [torch.zeros_like(t) for t in tensors], strict=True):
            t.add_(o)


def test_instruction_nll_over_two_ranks(model, tokenizers):
    tok = tokenizers[0]
    whole = instruction_nll(model, tok, RECORDS, max_length=48, batch_size=2)
    store: dict = {}
    instruction_nll(model, tok, RECORDS, max_length=48, batch_size=2, ctx=_TwoRanks(1, store))
    assert store[1][1].count_nonzero() == 1  # batches [0, 2), [2, 4), [4, 5): rank 1 scored the last one
    both = instruction_nll(model, tok, RECORDS, max_length=48, batch_size=2, ctx=_TwoRanks(0, store))
    assert both["nll"] == pytest.approx(whole["nll"], rel=1e-12) and both["tokens"] == whole["tokens"]
