"""Greedy generation and generation health: the loop detector, distinct-n, agreement, batching, stops."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from gqaprune.data.prompts import CODE_PROMPTS, INSTRUCTION_PROMPTS, PROMPT_SET_VERSION
from gqaprune.evaluation.generate import cut_at_stop, greedy_generate, prompt_ids
from gqaprune.evaluation.generation import (
    agreement,
    distinct_n,
    generation_health,
    loop_detected,
    side_by_side_markdown,
)
from gqaprune.models.random_models import build_model
from gqaprune.runtime.distributed import DistContext
from helpers import SAMPLE_TEXT, bpe_tokenizer

CHATML = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant\n{% endif %}")

# --- the loop detector ----------------------------------------------------------------------------
FIB_LOOP = """    if n is not 0:
        return n
    else n is not 0:
        return n
    else n is not 0:
        return n
    else n is not 0:
        return n
    else n is not 0:"""
ONE_LINE_LOOP = "    return fibonacci(n - 1)\n" * 6
PHRASE_LOOP = "In autumn, a leaf's fate is determined," + " a leaf's fate is determined," * 3 + " a leaf's"
WEEK_LOOP = "\n".join(f"{i + 1}. {d}" for i, d in enumerate(
    ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"] * 3 + ["Monday"]))
SENTENCE_LOOP = ("A cat is soft. They are known for their loyalty, as they are always ready to help. They love to "
                 "play. They are known for their loyalty, as they are always ready to help. They are known for "
                 "their loyalty, as they are always ready")
# inside one word, as a 20 %-pruned SmolLM2 wrote them
WORD_LOOP = "def is_empty_first_only_only_only_only_only_only_true_true_true_true_true_true_true_true_true(self):"
UNDERSCORES = "def is_prime_n_m_m_m_m_m_m_m_m" + "_" * 80
SCATTERED_LINE = "Use the print function here.\nok\nUse the print function here.\nfine\n" * 2

NUMBERED_LIST = "Here are the days of the week:\n\n" + "\n".join(
    f"{i + 1}. {d}" for i, d in enumerate(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday",
                                           "Sunday"]))
TIPS = ("1. Stay hydrated: drink plenty of water.\n2. Eat a balanced diet: vegetables, fruit and grains.\n"
        "3. Get enough sleep: aim for 7-8 hours each night.")
PYTHON_CODE = '''def is_prime(n):
    """Return True if n is prime."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    for k in range(3, int(n ** 0.5) + 1, 2):
        if n % k == 0:
            return False
    return True


class Stack:
    def __init__(self):
        self.items = []

    def push(self, x):
        self.items.append(x)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()

    def peek(self):
        if not self.items:
            raise IndexError("peek at empty stack")
        return self.items[-1]
'''
JS_BRACES = "function f(a) {\n  if (a) {\n    for (;;) {\n      break;\n    }\n  }\n}\n"
BANNERS = "# " + "=" * 70 + "\nBIG = 1000000000000000000000\nprint('-' * 40)\n# " + "-" * 70 + "\n"


@pytest.mark.parametrize("text", [FIB_LOOP, ONE_LINE_LOOP, PHRASE_LOOP, WEEK_LOOP, SENTENCE_LOOP, SCATTERED_LINE,
                                  WORD_LOOP, UNDERSCORES],
                         ids=["fib-if-else", "one-line", "phrase", "week", "sentence", "scattered-line", "in-word",
                              "underscores"])
def test_loops_are_detected(text):
    assert loop_detected(text)


@pytest.mark.parametrize("text", [NUMBERED_LIST, TIPS, PYTHON_CODE, JS_BRACES, BANNERS, "",
                                  "The capital of France is Paris.", "very very very good"],
                         ids=["week-list", "tips", "python", "braces", "banners", "empty", "sentence", "short-repeat"])
def test_normal_text_is_not_a_loop(text):
    assert not loop_detected(text)


def test_distinct_n():
    assert distinct_n(["a b c d"], 1) == 1.0
    assert distinct_n(["a a a a"], 1) == 0.25
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)  # (a b), (b a), (a b), (a b)
    assert distinct_n(["", "one"], 2) == 0.0


def test_agreement():
    dense = "The capital of France is Paris ."
    assert agreement(dense, dense) == 1.0
    assert agreement("The capital is Paris .", dense) == pytest.approx(5 / 7)  # in order, gaps allowed
    assert agreement("Paris . is France of capital The", dense) == pytest.approx(2 / 7)  # order matters
    assert agreement("", dense) == 0.0 and agreement("", "") == 1.0 and agreement("x", "") == 0.0
    long = " ".join(f"w{i}" for i in range(100))
    assert agreement(long, long + " extra") == 1.0  # only the first 32 words count


def test_side_by_side_markdown_flags_loops_and_survives_fences():
    doc = side_by_side_markdown(["def f():\n", "Say hi."], ["    return 1\n", "```python\nhi\n```"],
                                [ONE_LINE_LOOP, "hi"], "Dense vs pruned")
    assert doc.startswith("# Dense vs pruned")
    assert "looping texts: dense 0, pruned 1" in doc
    assert doc.count("LOOP") == 1
    assert "````\n```python" in doc  # a text holding a fence gets a longer fence
    assert side_by_side_markdown(["a", "b"], ["x", "y"], ["x", "y"], "t", limit=1).count("## ") == 1


def test_prompt_set():
    assert PROMPT_SET_VERSION >= 1
    assert 10 <= len(INSTRUCTION_PROMPTS) <= 16 and 6 <= len(CODE_PROMPTS) <= 10
    assert len(set(INSTRUCTION_PROMPTS)) == len(INSTRUCTION_PROMPTS)
    assert all(p.endswith("\n") for p in CODE_PROMPTS)  # raw completions continue on a new line


# --- the generator on a tiny random model ---------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    tok = bpe_tokenizer([SAMPLE_TEXT], 300, eos=True)
    model = build_model("tiny-llama-gqa4", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, dtype=torch.float64).eval()
    return model, tok


PROMPTS = ["Robert Boulter is", "The three primary", "no it was n't black monday but while the new york", "He",
           "the dow jones industrial average plunged"]


def test_batched_generation_equals_one_by_one(tiny):
    model, tok = tiny
    batched = greedy_generate(model, tok, PROMPTS, 12, batch_size=3, progress=False)
    single = [greedy_generate(model, tok, [p], 12, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert all(batched)  # a random model rarely picks EOS first
    assert greedy_generate(model, tok, PROMPTS, 12, batch_size=8, progress=False) == batched  # deterministic


def test_checkpoint_generation_settings_do_not_leak_in(tiny):
    model, tok = tiny
    plain = greedy_generate(model, tok, PROMPTS[:2], 12, progress=False)
    own = model.generation_config
    model.generation_config = copy.deepcopy(own)
    model.generation_config.repetition_penalty = 50.0  # would change every greedy pick if applied
    model.generation_config.no_repeat_ngram_size = 1
    try:
        assert greedy_generate(model, tok, PROMPTS[:2], 12, progress=False) == plain
        assert model.generation_config.repetition_penalty == 50.0  # restored after the call
    finally:
        model.generation_config = own


def _ascii_stop(text: str) -> tuple[str, int]:
    match = re.search(r"[ -~]{2}", text[1:])
    assert match, f"no ASCII pair in {text!r}"
    return match.group(), match.start() + 1


def test_stop_strings_cut_and_end_generation_early(tiny):
    model, tok = tiny
    prompt = PROMPTS[0]
    calls = []
    hook = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        full = greedy_generate(model, tok, [prompt], 40, progress=False)[0]
        n_full = len(calls)
        stop, at = _ascii_stop(full)
        calls.clear()
        cut = greedy_generate(model, tok, [prompt], 40, stop=[stop, "never-there"], progress=False)[0]
    finally:
        hook.remove()
    assert cut == full[:full.find(stop)]
    assert len(calls) < n_full  # the stopping criterion ended the batch before max_new_tokens
    assert cut_at_stop("abc\ndef x\nclass", ["\nclass", "\ndef "]) == "abc"
    assert cut_at_stop("abc", ["z"]) == "abc"


def test_chat_prompts_use_the_template(tiny):
    model, tok = tiny
    assert prompt_ids(tok, "Name a colour.", chat=True) == prompt_ids(tok, "Name a colour.")  # no template: raw
    templated = bpe_tokenizer([SAMPLE_TEXT], 300, eos=True)
    templated.chat_template = CHATML
    ids = prompt_ids(templated, "Name a colour.", chat=True)
    assert templated.decode(ids) == "<s>user\nName a colour.</s>\n<s>assistant\n"
    assert ids.count(templated.bos_token_id) == 2  # the template's own, no extra BOS added
    assert len(greedy_generate(model, templated, ["Name a colour."], 4, chat=True, progress=False)) == 1


class _TwoRanks(DistContext):
    """Rank ``rank`` of a pretend 2-rank job: all_gather_object pairs this rank's object with the other's."""

    def __init__(self, rank: int, store: dict):
        super().__init__(rank=rank, world_size=2)
        object.__setattr__(self, "store", store)

    def all_gather_object(self, obj):
        self.store[self.rank] = obj
        return [self.store.get(r, []) for r in range(self.world_size)]  # a rank not run yet: nothing


def test_ranks_split_prompts_and_return_all_texts_in_order(tiny):
    model, tok = tiny
    whole = greedy_generate(model, tok, PROMPTS, 6, batch_size=2, progress=False)
    store: dict = {}
    greedy_generate(model, tok, PROMPTS, 6, batch_size=2, ctx=_TwoRanks(1, store), progress=False)
    assert len(store[1]) == 2  # rank 1 generated only its share (prompts 3 and 4)
    assert greedy_generate(model, tok, PROMPTS, 6, batch_size=2, ctx=_TwoRanks(0, store), progress=False) == whole


def test_generation_health_on_a_tiny_model(tiny):
    model, tok = tiny
    dense = generation_health(model, tok, PROMPTS[:3], ["def f(x):\n", "class A:\n"], max_new_tokens=8)
    assert set(dense["texts"]) == {"instructions", "code"}
    assert len(dense["texts"]["instructions"]) == 3 and len(dense["texts"]["code"]) == 2
    assert 0.0 <= dense["loop_rate"] <= 1.0 and 0.0 < dense["distinct_1"] <= 1.0
    assert "agreement" not in dense
    again = generation_health(model, tok, PROMPTS[:3], ["def f(x):\n", "class A:\n"], max_new_tokens=8,
                              reference=dense)
    assert again["agreement"] == 1.0  # the same model, greedy: the same texts
    with pytest.raises(ValueError, match="reference"):
        generation_health(model, tok, PROMPTS[:2], ["def f(x):\n", "class A:\n"], max_new_tokens=2, reference=dense)


# --- the real model -------------------------------------------------------------------------------
@pytest.mark.slow
def test_dense_smollm2_writes_without_looping(tmp_path):
    """Dense SmolLM2-135M-Instruct: most instruction answers do not loop; code completions are not empty."""
    from transformers import AutoTokenizer

    from gqaprune.models.loading import load_model
    from gqaprune.models.sources import convert_embedded

    folder = convert_embedded(tmp_path / "model")
    model, tok = load_model(folder).eval(), AutoTokenizer.from_pretrained(folder)
    health = generation_health(model, tok, INSTRUCTION_PROMPTS, CODE_PROMPTS, max_new_tokens=128)
    texts = health["texts"]
    assert health["loop_rate_instructions"] <= 0.5, [t for t in texts["instructions"] if loop_detected(t)]
    assert all(t.strip() for t in texts["instructions"] + texts["code"])
    assert any("Paris" in t for t in texts["instructions"])  # it still knows the capital of France
    assert sum("return" in t for t in texts["code"]) >= 2
