"""CPU evaluation speed: tokens/s of perplexity-evaluation variants, interleaved so they share the same load.

    python benchmarks/eval_speed.py --model artifacts/model --data-dir ../shared/data \
        --out benchmarks/results/quality3_smollm2/eval_speed.json

Each round runs every variant once on the same ``--windows`` windows (spread over WikiText-2 test) and
the median tokens/s over ``--rounds`` rounds is reported, with each variant's log-perplexity on those
windows (exactness: float32 variants must agree to rounding; bfloat16 is reported as a difference).
Variants:

* ``logits-f32-b8-t2``: the previous evaluation (full ``[b, T, V]`` float32 logits, per-row
  cross-entropy), batch 8, 2 threads: the pipeline's setting before this change;
* ``chunk-f32-b{8,16}-t{1,2}``: final hidden states + LM head / cross-entropy in row chunks;
* ``chunk-bf16-b16-t{1,2}``: the same with the model's weights in bfloat16 (cross-entropy in float32).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import typer

from gqaprune.data.windows import corpus_token_ids
from gqaprune.evaluation.perplexity import eval_windows, window_nlls
from gqaprune.models.loading import load_model, load_tokenizer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _logits_path(model, windows: torch.Tensor, batch: int) -> float:
    """The previous implementation: full logits, then cross-entropy one row at a time."""
    total = 0.0
    with torch.inference_mode():
        for s in range(0, windows.shape[0], batch):
            b = windows[s:s + batch]
            logits = model(input_ids=b, use_cache=False).logits
            for r in range(b.shape[0]):
                total += F.cross_entropy(logits[r, :-1].float(), b[r, 1:], reduction="none").double().sum().item()
    return total / (windows.shape[0] * (windows.shape[1] - 1))


@app.command()
def main(
    model: Annotated[str, typer.Option()] = "artifacts/model",
    data_dir: Annotated[str, typer.Option()] = "../shared/data",
    out: Annotated[Path, typer.Option()] = Path("benchmarks/results/quality3_smollm2/eval_speed.json"),
    windows: Annotated[int, typer.Option(help="Windows of 128 tokens per variant and round.")] = 32,
    rounds: Annotated[int, typer.Option()] = 3,
    variants: Annotated[str, typer.Option()] = ("logits-f32-b8-t2,chunk-f32-b8-t2,chunk-f32-b16-t2,chunk-f32-b16-t1,"
                                                 "chunk-bf16-b16-t1,chunk-bf16-b16-t2"),
) -> None:
    """Measure and write ``{variant: {tok_s, log_ppl, ...}}``."""
    dense, tok = load_model(model, device="cpu"), load_tokenizer(model)
    bf16 = copy.deepcopy(dense).to(torch.bfloat16)
    ids = corpus_token_ids(tok, "wikitext2", "test", data_dir=data_dir)
    w, _ = eval_windows(ids, 128, windows * 128, spread=True)
    names = [v for v in variants.split(",") if v]
    times: dict[str, list[float]] = {n: [] for n in names}
    values: dict[str, float] = {}
    for r in range(rounds + 1):  # round 0 warms up
        for name in names:
            path, dtype, batch, threads = name.split("-")
            torch.set_num_threads(int(threads[1:]))
            m = bf16 if dtype == "bf16" else dense
            t = time.perf_counter()
            if path == "logits":
                v = _logits_path(m, w, int(batch[1:]))
            else:
                v = float(window_nlls(m, w, int(batch[1:])).mean())
            dt = time.perf_counter() - t
            if r:
                times[name].append(w.numel() / dt)
            values[name] = v
            print(json.dumps({"round": r, "variant": name, "tok_s": round(w.numel() / dt, 1), "log_ppl": v}),
                  flush=True)
    ref = values[names[0]]
    result = {n: {"tok_s_median": round(statistics.median(times[n]), 1), "tok_s": [round(x, 1) for x in times[n]],
                  "log_ppl": values[n], "log_ppl_minus_first": values[n] - ref} for n in names}
    result["_setup"] = {"windows": windows, "seq_len": 128, "rounds": rounds, "model": model,
                        "load_avg": list(map(float, Path("/proc/loadavg").read_text().split()[:3]))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    app()
