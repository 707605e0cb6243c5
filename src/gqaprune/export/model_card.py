"""Model cards (README.md with YAML front matter) for pruned and finetuned checkpoint folders.

The Hugging Face hub reads the front matter (``base_model``, ``tags``, ``library_name``,
``pipeline_tag``); the body says what was pruned, how, and what it measured. The text is a pure
function of its inputs: no dates, no machine names, sorted keys, so equal inputs give equal bytes and
a DVC stage that writes it stays reproducible.

YAML is written by hand with JSON-quoted strings (a JSON string is a valid YAML scalar), so no YAML
library is needed and quoting can never go wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from gqaprune.runtime.files import atomic_path

#: Plan keys shown in the card (those that shape the result), in this order.
PLAN_KEYS = ("ratio", "strategy", "importance", "temperature", "tau", "epsilon", "mlp_align",
             "freeze_first_n_layers", "freeze_last_n_layers", "normalize", "prior_norm")
BASE_TAGS = ("gqaprune", "pruned", "structured-pruning", "gqa")


def _q(value) -> str:
    """A YAML scalar: numbers and booleans as they are, everything else JSON-quoted."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return ".inf" if value == float("inf") else repr(round(value, 6))  # YAML spells infinity .inf
    if value in (".inf", "-.inf"):  # infinity as JSON artifacts spell it (runtime.files.json_safe)
        return value
    return json.dumps(str(value), ensure_ascii=False)


def _fmt_ppl(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def model_card(*, name: str, base_model: str, kind: str = "pruned", model_type: str = "llama",
               plan: Mapping | None = None, compensation: str | None = None,
               params_before: int | None = None, params_after: int | None = None,
               layers: Sequence[Mapping] | None = None, removed_layers: Sequence[int] = (),
               perplexity: Mapping[str, float] | None = None, dense_perplexity: Mapping[str, float] | None = None,
               seq_len: int | None = None, tokens_evaluated: Mapping[str, int] | None = None,
               finetune: Mapping | None = None, gguf_files: Mapping[str, int] | None = None,
               license: str | None = None, abilities: Mapping | None = None,
               dense_abilities: Mapping | None = None, generations: str | None = None) -> str:
    """The README.md text of one checkpoint folder.

    ``kind``: "pruned" or "finetuned" (LoRA-recovered). ``plan``: the plan params (``plan.json``'s
    ``params``; the keys in :data:`PLAN_KEYS` are shown). ``layers``: ``config.gqaprune_layers`` when the
    shapes differ per layer. ``perplexity`` / ``dense_perplexity``: dataset -> perplexity measured on
    this model and on the dense one, over ``tokens_evaluated`` tokens in windows of ``seq_len``.
    ``gguf_files``: exported GGUF file name -> size in bytes. ``abilities`` / ``dense_abilities``: what this
    model and the dense one do (the evaluate stage's task figures: HumanEval, instruction NLL, generation
    health, lm-eval tasks); ``generations``: the file, beside the card, with both models' continuations.
    Equal arguments give equal text.
    """
    if kind not in ("pruned", "finetuned"):
        raise ValueError(f"kind {kind!r} must be 'pruned' or 'finetuned'")
    plan = dict(plan or {})
    tags = [*BASE_TAGS, model_type, *(["lora"] if kind == "finetuned" else []), *(["gguf"] if gguf_files else [])]
    fm = ["---", f"base_model: {_q(base_model)}", "library_name: transformers", "pipeline_tag: text-generation"]
    if license:
        fm.append(f"license: {_q(license)}")
    fm.append("tags:")
    fm += [f"- {_q(t)}" for t in tags]
    fm.append("gqaprune:")
    fm.append(f"  kind: {_q(kind)}")
    for key in PLAN_KEYS:
        if key in plan:
            fm.append(f"  {key}: {_q(plan[key])}")
    if compensation:
        fm.append(f"  compensation: {_q(compensation)}")
    if params_before is not None:
        fm.append(f"  params_before: {params_before}")
    if params_after is not None:
        fm.append(f"  params_after: {params_after}")
    if perplexity:
        fm.append("  perplexity:")
        fm += [f"    {_q(k)}: {_q(float(perplexity[k]))}" for k in sorted(perplexity)]
    if dense_perplexity:
        fm.append("  dense_perplexity:")
        fm += [f"    {_q(k)}: {_q(float(dense_perplexity[k]))}" for k in sorted(dense_perplexity)]
    if seq_len is not None:
        fm.append(f"  seq_len: {seq_len}")
    fm.append("---")

    what = "structurally pruned" if kind == "pruned" else "structurally pruned and LoRA-recovered"
    body = [f"# {name}", "",
            f"A {what} version of [{base_model}](https://huggingface.co/{base_model}) made with gqaprune "
            "(GQA-aware structured pruning). Whole KV-head groups (a KV head with its query heads) and "
            "SwiGLU channels were removed, so the result is a smaller dense model, not a masked one.", ""]
    if params_before and params_after:
        body.append(f"Parameters: {params_after:,} of {params_before:,} "
                    f"({100 * (1 - params_after / params_before):.1f} % removed, embeddings included).")
        body.append("")
    if plan:
        body += ["## How it was pruned", "", "| setting | value |", "|---|---|"]
        body += [f"| {k} | {'null (default)' if plan[k] is None else plan[k]} |" for k in PLAN_KEYS if k in plan]
        if compensation:
            body.append(f"| output compensation | {compensation} |")
        body.append("")
    if finetune:
        body += ["## Recovery fine-tuning (LoRA, merged)", "", "| setting | value |", "|---|---|"]
        body += [f"| {k} | {finetune[k]} |" for k in sorted(finetune)]
        body.append("")
    if perplexity:
        window = f" (windows of {seq_len} tokens)" if seq_len else ""
        body += [f"## Perplexity{window}", "", "| dataset | this model | dense | ratio | tokens |",
                 "|---|---:|---:|---:|---:|"]
        for k in sorted(perplexity):
            d = (dense_perplexity or {}).get(k)
            ratio = f"{perplexity[k] / d:.3f}x" if d else ""
            n = (tokens_evaluated or {}).get(k, "")
            body.append(f"| {k} | {_fmt_ppl(perplexity[k])} | {_fmt_ppl(d)} | {ratio} | {n} |")
        body.append("")
    if abilities:
        body += _abilities_table(abilities, dense_abilities or {}, generations)
    if layers or removed_layers:
        body += ["## Layer shapes", ""]
        if removed_layers:
            body.append(f"Removed decoder layers (dense indices): {', '.join(map(str, removed_layers))}.")
            body.append("")
        if layers:
            body += ["| layer | dense layer | KV heads | MLP channels |", "|---:|---:|---:|---:|"]
            body += [f"| {i} | {s.get('source_layer', i)} | {s['num_key_value_heads']} | {s['intermediate_size']} |"
                     for i, s in enumerate(layers)]
            body += ["", "Layers differ in shape, so loading needs the bundled code: "
                     "`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`; "
                     "llama.cpp runs the GGUF export (`gqaprune export-gguf`).", ""]
    if gguf_files:
        body += ["## GGUF (llama.cpp)", "", "| file | bytes |", "|---|---:|"]
        body += [f"| {f} | {gguf_files[f]:,} |" for f in sorted(gguf_files)]
        body += ["", "```bash", f"llama-cli -m {sorted(gguf_files)[0]} -cnv", "```", ""]
    return "\n".join(fm + [""] + body).rstrip("\n") + "\n"


def _abilities_table(mine: Mapping, dense: Mapping, generations: str | None) -> list[str]:
    """The card's "What it can still do" section: each measure of this model next to the dense model's."""
    rows = []

    def row(label, a, b, kept):
        rows.append(f"| {label} | {a} | {b} | {kept} |")

    def num(x, digits=3):
        return "" if x is None else f"{x:.{digits}f}"

    h, hd = mine.get("humaneval"), dense.get("humaneval") or {}
    if h:
        kept = f"{100 * h['pass_at_1'] / hd['pass_at_1']:.0f} %" if hd.get("pass_at_1") else ""
        row(f"HumanEval pass@1, greedy ({h['problems']} problems)", f"{h['passed']} / {h['problems']}",
            f"{hd.get('passed', '')} / {hd.get('problems', '')}", kept)
    if "instruction_nll" in mine:
        d = dense.get("instruction_nll")
        row("instruction answers, NLL per token (held-out records)", num(mine["instruction_nll"]), num(d),
            f"{mine['instruction_nll'] / d:.3f}x" if d else "")
    g, gd = mine.get("generation"), dense.get("generation") or {}
    if g:
        row("greedy continuations that loop", f"{100 * g['loop_rate']:.0f} %",
            f"{100 * gd['loop_rate']:.0f} %" if "loop_rate" in gd else "",
            f"{100 * (g['loop_rate'] - gd['loop_rate']):+.0f} points" if "loop_rate" in gd else "")
        row("distinct-2 of the continuations", num(g.get("distinct_2")), num(gd.get("distinct_2")), "")
        if "agreement" in g:
            row("agreement with the dense continuations", num(g["agreement"]), "1.000", "")
    for task, r in sorted((mine.get("tasks") or {}).items()):
        d = (dense.get("tasks") or {}).get(task, {})
        kept = f"{100 * r['value'] / d['value']:.1f} %" if d.get("value") else ""
        row(f"{task} ({r['metric']})", f"{r['value']:.4f} ± {r['stderr']:.4f}", num(d.get("value"), 4), kept)
    if not rows:
        return []
    out = ["## What it can still do", "", "| measure | this model | dense | kept |", "|---|---:|---:|---:|", *rows, ""]
    if generations:
        out += [f"Greedy continuations of the dense model and this one, side by side: [{generations}]({generations}).",
                ""]
    return out


def card_for_checkpoint(model_dir: str | os.PathLike, *, base_model: str, kind: str = "pruned",
                        metrics: Mapping | None = None, gguf_files: Mapping[str, int] | None = None,
                        name: str | None = None, generations: str | None = None) -> str:
    """:func:`model_card` filled from a checkpoint folder's ``config.json`` (``gqaprune_info``, layer shapes).

    ``metrics``: the evaluate stage's ``artifacts/evaluation/results.json`` (its ``ppl[kind]``, ``ppl.dense``,
    ``seq_len`` and ``tokens_evaluated`` are used) or None.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    info = config.get("gqaprune_info") or {}
    metrics = metrics or {}
    ppl = metrics.get("ppl", {})
    surgery = info.get("surgery") or {}
    return model_card(
        name=name or model_dir.name, base_model=base_model, kind=kind,
        model_type=str(config.get("model_type", "llama")), plan=info.get("plan"),
        compensation=surgery.get("compensation"), params_before=info.get("params_before"),
        params_after=metrics.get("params_after", info.get("params_after")),
        layers=config.get("gqaprune_layers"), removed_layers=info.get("removed_layers") or (),
        perplexity=ppl.get(kind), dense_perplexity=ppl.get("dense"), seq_len=metrics.get("seq_len"),
        tokens_evaluated=metrics.get("tokens_evaluated"),
        finetune=info.get("finetune") if kind == "finetuned" else None,
        gguf_files=gguf_files, abilities=(metrics.get("abilities") or {}).get(kind),
        dense_abilities=(metrics.get("abilities") or {}).get("dense"), generations=generations,
    )


def write_model_card(model_dir: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as ``model_dir/README.md`` (temporary file + rename; never through a hard link)."""
    path = Path(model_dir) / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
