"""Generation health: does the model still write sensible text and code, or does it loop?

Perplexity can stay close to the dense model's while greedy generation collapses into repeating one
line. These measures read what the model *writes* (greedy, :func:`gqaprune.evaluation.generate.greedy_generate`):

* :func:`loop_detected` -- a degenerate repetition in one text. Words are whitespace tokens; a line is
  *contentful* when it holds a letter or digit (blank lines, ``}``, ``---`` and fences are not) and is
  compared without its list marker (``3.``, ``4)``, ``-``, ``*``). A text loops when any of:

  1. a block of 1 to 16 contentful lines occurs 3 times back to back (blank lines between do not
     count): one line repeated, two lines alternating (``if n is not 0:`` / ``else n is not 0:``), the
     days of the week listed over and over;
  2. a run of ``p >= 4`` words holding a letter or digit occurs 3 times back to back (``p`` up to 64
     words: a phrase repeated inside a line);
  3. one contentful line of at least 3 words or 16 characters occurs 4 times anywhere (short
     lines such as ``else:``, ``return False`` or ``pass`` legitimately recur in code);
  4. one run of 10 words occurs 3 times anywhere (a sentence the model keeps coming back to);
  5. inside a word: a unit of 1 to 16 non-space characters holding a letter repeats 6 times back to
     back over at least 20 characters (``fefefefe...``, ``_square_square_square...``), or a run of
     word characters is at least 64 long (``is_prime_n_m_m______...``).

  Tuned on SmolLM2-135M-Instruct's dense outputs on :mod:`gqaprune.data.prompts` (its looping haiku,
  endless week and repeated sentence flagged; its lists, prose and code not) and on those of a 20 %
  wanda-pruned SmolLM2 (every degenerate text flagged; an echoed prompt and an empty answer not).
  Human-written text it flags rarely: 2 of the 1,199 local Alpaca answers (a screenplay repeating
  ``(voice from phone)``), 23 of 8,336 16-line chunks of CPython's standard library (0.3 %: a line
  such as ``return NotImplemented`` 4 times, hex masks ``ffff:ffff:...``).
* :func:`distinct_n` -- distinct word n-grams over all n-grams of all texts (Li et al. 2016).
* :func:`agreement` -- how much of the dense continuation a pruned continuation reproduces: the
  longest common subsequence of the first ``k = 32`` words of each, over the dense text's count
  (1.0: the same opening words in the same order; order matters, position does not).
* :func:`generation_health` -- all of them on a prompt set; :func:`side_by_side_markdown` the
  document a person reads.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from gqaprune.evaluation.generate import generation_batch, greedy_generate
from gqaprune.runtime.distributed import DistContext

__all__ = ["agreement", "distinct_n", "generation_health", "loop_detected", "side_by_side_markdown"]

AGREEMENT_WORDS = 32  # words of each text that agreement() compares
MAX_PERIOD = 64  # longest repeated word run looked for (words)
_WORD = re.compile(r"\w")
_MARKER = re.compile(r"^(?:\d+[.)]|[-*+\u2022])\s+")
_CHAR_LOOP = re.compile(r"(\S{1,16}?)\1{5,}")  # a unit and at least 5 more copies of it, back to back
_LONG_WORD = re.compile(r"\w{64,}")
_LETTER = re.compile(r"[^\W\d_]")
MAX_BLOCK = 16  # longest repeated block of lines looked for (lines)
LONG_NGRAM = 10  # rule 4's run of words


def _contentful_lines(text: str) -> list[str]:
    """Stripped lines holding a letter or digit, list markers removed."""
    lines = (_MARKER.sub("", line.strip()) for line in text.splitlines())
    return [s for s in lines if _WORD.search(s)]


def _repeated_block(lines: list[str], repeats: int = 3) -> bool:
    """True when some block of 1..MAX_BLOCK lines occurs ``repeats`` times back to back."""
    n = len(lines)
    for k in range(1, min(MAX_BLOCK, n // repeats) + 1):
        run = 0
        for j in range(n - k):
            run = run + 1 if lines[j] == lines[j + k] else 0
            if run >= (repeats - 1) * k:
                return True
    return False


def _repeated_run(words: list[str], min_period: int = 4, repeats: int = 3) -> bool:
    """True when some run of ``p >= min_period`` words (holding a letter or digit) occurs ``repeats``
    times back to back: ``words[i + j] == words[i + j + p]`` for ``(repeats - 1) * p`` consecutive ``j``."""
    n = len(words)
    for p in range(min_period, min(MAX_PERIOD, n // repeats) + 1):
        need, run = (repeats - 1) * p, 0
        for j in range(n - p):
            run = run + 1 if words[j] == words[j + p] else 0
            if run >= need and any(_WORD.search(w) for w in words[j - run + 1: j - run + 1 + p]):
                return True
    return False


def loop_detected(text: str) -> bool:
    """True when ``text`` repeats itself degenerately (the five rules of the module docstring)."""
    lines = _contentful_lines(text)
    words = text.split()
    if _repeated_block(lines) or _repeated_run(words):
        return True
    long_lines = [s for s in lines if len(s.split()) >= 3 or len(s) >= 16]
    if any(c >= 4 for c in Counter(long_lines).values()):
        return True
    grams = Counter(tuple(words[i:i + LONG_NGRAM]) for i in range(len(words) - LONG_NGRAM + 1))
    if any(c >= 3 and any(_WORD.search(w) for w in gram) for gram, c in grams.items()):
        return True
    if _LONG_WORD.search(text):
        return True
    return any(len(m.group()) >= 20 and _LETTER.search(m.group(1)) for m in _CHAR_LOOP.finditer(text))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over ``texts`` (words: whitespace tokens); 0.0 when none."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.split()
        grams += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def agreement(a: str, b: str, k: int = AGREEMENT_WORDS) -> float:
    """Share of the reference ``b``'s first ``k`` words that ``a``'s first ``k`` words reproduce in order.

    ``LCS(words(a)[:k], words(b)[:k]) / len(words(b)[:k])`` with words = whitespace tokens; ``b`` is the
    reference (the dense model's text), ``a`` the candidate. Two empty texts agree (1.0); an empty
    reference and a non-empty candidate do not (0.0).
    """
    x, y = a.split()[:k], b.split()[:k]
    if not y:
        return 1.0 if not x else 0.0
    prev = [0] * (len(y) + 1)  # LCS table row by row: prev[j] = LCS(x[:i], y[:j])
    for xi in x:
        cur = [0]
        for j, yj in enumerate(y):
            cur.append(prev[j] + 1 if xi == yj else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / len(y)


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def generation_health(model, tokenizer, instruction_prompts: Sequence[str], code_prompts: Sequence[str],
                      max_new_tokens: int = 128, batch_size: int = 8, reference: dict | None = None,
                      ctx: DistContext | None = None) -> dict:
    """Greedy generations on a prompt set and how healthy they are.

    Instruction prompts go through the chat template (``chat=True``), no stop strings (EOS or
    ``max_new_tokens`` ends them); code prompts are raw completions. ``reference``: a previous result
    of this function (the dense model's) whose ``texts`` the ``agreement`` is measured against.

    Returns:
        ``{"loop_rate", "loop_rate_instructions", "loop_rate_code", "distinct_1", "distinct_2",
        "agreement" (mean over all prompts; with ``reference`` only, as are "agreement_instructions"
        and "agreement_code"), "loops": {"instructions": [bool], "code": [bool]},
        "texts": {"instructions": [str], "code": [str]}}``.
    """
    # one greedy pass over every prompt, in wide batches (generation_batch says why)
    prompts = list(instruction_prompts) + list(code_prompts)
    found = greedy_generate(model, tokenizer, prompts, max_new_tokens, generation_batch(batch_size, len(prompts)),
                            ctx=ctx, chat=[True] * len(instruction_prompts) + [False] * len(code_prompts),
                            desc="generation")
    texts = {"instructions": found[:len(instruction_prompts)], "code": found[len(instruction_prompts):]}
    loops = {kind: [loop_detected(t) for t in found] for kind, found in texts.items()}
    everything = texts["instructions"] + texts["code"]
    result = {
        "loop_rate": _rate(loops["instructions"] + loops["code"]),
        "loop_rate_instructions": _rate(loops["instructions"]),
        "loop_rate_code": _rate(loops["code"]),
        "distinct_1": distinct_n(everything, 1),
        "distinct_2": distinct_n(everything, 2),
    }
    if reference is not None:
        ref = reference.get("texts", reference)
        scores = {}
        for kind, found in texts.items():
            if len(ref.get(kind, [])) != len(found):
                raise ValueError(f"reference texts[{kind!r}] hold {len(ref.get(kind, []))} texts, expected "
                                 f"{len(found)}: regenerate the dense reference on the same prompt set")
            scores[kind] = [agreement(t, r) for t, r in zip(found, ref[kind], strict=True)]
        result["agreement"] = _rate(scores["instructions"] + scores["code"])
        result["agreement_instructions"] = _rate(scores["instructions"])
        result["agreement_code"] = _rate(scores["code"])
    result["loops"] = loops
    result["texts"] = texts
    return result


def _fenced(text: str, lang: str = "") -> str:
    """``text`` in a fenced block whose fence is longer than any backtick run inside it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def side_by_side_markdown(prompts: Sequence[str], dense_texts: Sequence[str], pruned_texts: Sequence[str],
                          title: str, limit: int | None = None) -> str:
    """A Markdown document: per prompt, the prompt, the dense text and the pruned text, with loop flags.

    ``limit``: only the first ``limit`` prompts. The counts of looping texts head the document.
    """
    if not len(prompts) == len(dense_texts) == len(pruned_texts):
        raise ValueError(f"got {len(prompts)} prompts, {len(dense_texts)} dense and {len(pruned_texts)} pruned texts")
    rows = list(zip(prompts, dense_texts, pruned_texts, strict=True))[:limit]
    dense_loops = [loop_detected(d) for _, d, _ in rows]
    pruned_loops = [loop_detected(p) for _, _, p in rows]
    out = [f"# {title}", "",
           f"{len(rows)} prompts; looping texts: dense {sum(dense_loops)}, pruned {sum(pruned_loops)}.", ""]
    for i, ((prompt, dense, pruned), dl, pl) in enumerate(zip(rows, dense_loops, pruned_loops, strict=True), 1):
        out += [f"## {i}. {prompt.strip().splitlines()[0][:80] if prompt.strip() else '(empty prompt)'}", "",
                "**Prompt**", "", _fenced(prompt), "",
                f"**Dense**{' — LOOP' if dl else ''}", "", _fenced(dense), "",
                f"**Pruned**{' — LOOP' if pl else ''} (agreement with dense {agreement(pruned, dense):.2f})", "",
                _fenced(pruned), ""]
    return "\n".join(out)
