"""llama.cpp benchmark of pruned SmolLM2: GGUF export, quantisation, speed and perplexity on this machine.

    python benchmarks/llamacpp_bench.py --data-dir ../shared/data --out benchmarks/results/llamacpp

1. dense SmolLM2-135M-Instruct (the embedded model) and the library's 20 % / 30 % prunes of it, made
   as the pipeline makes them: Taylor scores on 64 x 128 calibration tokens of WikiText-2 validation,
   ``gqaprune.pruning.plan.build_plan`` with the ``plan`` section of params.yaml (only the ratio changed),
   least-squares output compensation (``surgery.compensation`` / ``surgery.ridge``);
2. each exported to GGUF (f32 and f16) and quantised by llama.cpp to Q8_0, Q4_0 and Q4_K_M from an f16
   export whose MLP widths are zero-padded to multiples of ``--ffn-multiple`` (32: the Q8_0 / Q4_0 block;
   the plan's widths are multiples of 8 and would otherwise stay F16 in the quantised file);
3. WikiText-2 test perplexity over the same first ``--eval-tokens`` tokens (windows of 128) in HF
   (float32) and in llama.cpp for every file;
4. llama.cpp speed with ``--threads`` threads: prompt processing of a ``--pp``-token prompt and generation
   of ``--tg`` tokens one by one from an empty context (llama-bench's pp512 / tg128), ``--reps``
   repetitions interleaved over the files, median tokens/s.

Large files go to ``--work`` (default /tmp, outside the repository); ``--out`` gets results.json and
results.md. llama.cpp is called through llama-cpp-python (the same libllama its CLI tools use).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
import yaml

from gqaprune.config.loading import parse_params
from gqaprune.data.windows import calibration_samples, corpus_token_ids
from gqaprune.evaluation.perplexity import perplexity
from gqaprune.export.gguf import export_gguf
from gqaprune.export.llama_cpp import llama_cpp_logits, load_llama, quantize_gguf, window_nll
from gqaprune.models.adapters import get_adapter
from gqaprune.models.groups import parameter_counts
from gqaprune.models.loading import load_model, load_tokenizer
from gqaprune.models.sources import convert_embedded
from gqaprune.pruning.compensation import collect_stats, compensated_outputs
from gqaprune.pruning.importance import score_groups
from gqaprune.pruning.plan import build_plan
from gqaprune.pruning.surgery import prune_model, save_pruned

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
REPO = Path(__file__).resolve().parents[1]


def _machine() -> dict:
    """CPU model, cores and load, so the figures can be read against the machine that produced them."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = info.get("Flags", "")
    return {"cpu": info.get("Model name", "?").strip(), "cores": os.cpu_count(),
            "avx512": "avx512f" in flags, "loadavg_at_start": os.getloadavg(), "python": platform.python_version(),
            "llama_cpp_python": __import__("llama_cpp").__version__}


def _make_models(work: Path, params, data_dir: str, ratios: list[float]) -> dict[str, Path]:
    """Dense + pruned checkpoint folders (made once; an existing folder is reused)."""
    dense_dir = work / "dense"
    if not (dense_dir / "config.json").is_file():
        convert_embedded(dense_dir)
    folders = {"dense": dense_dir}
    todo = [r for r in ratios if not (work / f"pruned{round(100 * r)}" / "config.json").is_file()]
    if todo:
        dense, tok = load_model(dense_dir, device="cpu"), load_tokenizer(dense_dir)
        adapter = get_adapter(dense.config)
        geometry = adapter.geometry(dense.config)
        counts = parameter_counts(dense, adapter, geometry)
        c = params.calibrate
        samples = calibration_samples(tok, c.dataset, None, c.n_samples, c.seq_len, c.seed, data_dir=data_dir)
        scores = score_groups(dense, samples, metrics=[params.plan.importance],
                              gradient_batch_size=params.score.gradient_batch_size)
        stats = collect_stats(dense, samples, list(range(geometry.num_layers)))
        for r in todo:
            cfg = dataclasses.replace(params.plan, ratio=r)
            plan = build_plan(scores, None, counts, geometry.num_layers, cfg)
            model = copy.deepcopy(dense)
            repl = compensated_outputs(model, plan.keep, stats, params.surgery.compensation, params.surgery.ridge)
            prune_model(model, plan.keep, repl)
            info = {"plan": dataclasses.asdict(cfg), "surgery": dataclasses.asdict(params.surgery),
                    "removed_layers": plan.analysis["removed_layers"], "params_before": counts.total,
                    "params_after": parameter_counts(model, get_adapter(model.config), geometry).total}
            save_pruned(model, tok, work / f"pruned{round(100 * r)}", info)
    for r in ratios:
        folders[f"pruned{round(100 * r)}"] = work / f"pruned{round(100 * r)}"
    return folders


def _speed(path: Path, threads: int, pp: int, tg: int, seed: int) -> tuple[float, float, float, float]:
    """One run: a ``pp``-token prompt in one batch, then ``tg`` single-token decodes from an empty context,
    with llama.cpp's default (f16) KV cache.

    Returns (prompt tokens/s, generated tokens/s) by wall clock and the same two by process CPU time
    divided by ``threads``. On a machine shared with other jobs the wall clock also counts time the
    threads waited for a core; CPU time does not (ggml's threads spin while they wait for each other,
    so CPU time / threads approximates the wall time of an idle machine)."""
    llm = load_llama(path, n_ctx=max(pp, tg) + 8, n_threads=threads, logits_all=False, kv_f32=False)
    try:
        rng = np.random.default_rng(seed)
        prompt = rng.integers(100, llm.n_vocab(), pp).tolist()
        llm.reset()
        t0, c0 = time.perf_counter(), time.process_time()
        llm.eval(prompt)
        pp_s, pp_c = time.perf_counter() - t0, (time.process_time() - c0) / threads
        llm.reset()
        gen = rng.integers(100, llm.n_vocab(), tg).tolist()
        t0, c0 = time.perf_counter(), time.process_time()
        for token in gen:
            llm.eval([token])
        tg_s, tg_c = time.perf_counter() - t0, (time.process_time() - c0) / threads
    finally:
        llm.close()
    return pp / pp_s, tg / tg_s, pp / pp_c, tg / tg_c


def _weight_bytes_per_token(path: Path) -> int:
    """Bytes of weights one generated token reads: every 2-D tensor but the token embedding (one row read)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    names = {t.name for t in r.tensors}
    total = 0
    for t in r.tensors:
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue  # untied: the embedding is only gathered
        total += int(t.n_bytes)  # tied: token_embd is the output matrix, read whole
    return total


@app.command()
def main(
    data_dir: Annotated[str, typer.Option(help="Local corpora mirror.")] = "../shared/data",
    out: Annotated[Path, typer.Option(help="Where results.json / results.md go.")] = (
        REPO / "benchmarks/results/llamacpp"),
    work: Annotated[Path, typer.Option(help="Checkpoints and GGUF files (large; outside the repo).")] = Path(
        "/tmp/gqaprune_llamacpp_bench"),
    ratios: Annotated[str, typer.Option(help="Pruning ratios (of all parameters).")] = "0.2,0.3",
    quant: Annotated[str, typer.Option(help="llama.cpp quantisation types.")] = "Q8_0,Q4_0,Q4_K_M",
    ffn_multiple: Annotated[int, typer.Option(help="MLP width padding of the file that is quantised.")] = 32,
    threads: Annotated[int, typer.Option(help="llama.cpp threads.")] = 2,
    reps: Annotated[int, typer.Option(help="Speed repetitions (median and best reported).")] = 7,
    pp: Annotated[int, typer.Option(help="Prompt tokens for prompt-processing speed.")] = 512,
    tg: Annotated[int, typer.Option(help="Generated tokens for generation speed.")] = 128,
    eval_tokens: Annotated[int, typer.Option(help="WikiText-2 test tokens for perplexity (windows of 128).")] = 4096,
    quality: Annotated[bool, typer.Option(help="Export, quantise and measure perplexity (else reuse the files "
                                                "and results.json of an earlier run).")] = True,
    speed: Annotated[bool, typer.Option(help="Measure llama.cpp speed.")] = True,
) -> None:
    """Make the models, export and quantise them, and measure perplexity and speed in llama.cpp."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    params = parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    machine = _machine()
    folders = _make_models(work, params, data_dir, [float(r) for r in ratios.split(",") if r])
    qtypes = [q for q in quant.split(",") if q]
    kinds = ["f32", "f16", *qtypes]
    files = {(name, kind): work / f"{name}-{kind}.gguf" for name in folders for kind in kinds}
    rows: dict[str, dict] = {}
    seq_len = 128
    if not quality:  # speed only: the models, files and perplexities of the last run
        previous = json.loads((out / "results.json").read_text())
        rows = previous["models"]
        machine["quality_run"] = previous["machine"]
    for name, folder in (folders.items() if quality else ()):
        model, tok = load_model(folder, device="cpu"), load_tokenizer(folder)
        counts = parameter_counts(model, get_adapter(model.config), get_adapter(model.config).geometry(model.config))
        hf = perplexity(model, tok, "wikitext2", seq_len=seq_len, max_tokens=eval_tokens, data_dir=data_dir)
        ids = corpus_token_ids(tok, "wikitext2", "test", data_dir=data_dir)
        windows = ids[: (eval_tokens // seq_len) * seq_len].view(-1, seq_len)
        del model
        row = {"params": counts.total, "hf_f32_ppl": hf.ppl, "eval_tokens": hf.n_tokens, "files": {}}
        for dtype in ("f32", "f16"):
            t0 = time.perf_counter()
            report = export_gguf(folder, work / f"{name}-{dtype}.gguf", dtype=dtype)
            files[(name, dtype)] = work / f"{name}-{dtype}.gguf"
            row["arch"] = report.arch
            row["placeholders"] = report.placeholders
            row["files"][dtype] = {"export_s": round(time.perf_counter() - t0, 1)}
        qsrc = work / f"{name}-f16-pad{ffn_multiple}.gguf"
        export_gguf(folder, qsrc, dtype="f16", ffn_multiple=ffn_multiple)
        for q in qtypes:
            t0 = time.perf_counter()
            files[(name, q)] = quantize_gguf(qsrc, work / f"{name}-{q}.gguf", q, nthread=threads)
            row["files"][q] = {"quantize_s": round(time.perf_counter() - t0, 1)}
        for kind in ("f32", "f16", *qtypes):
            path = files[(name, kind)]
            entry = row["files"][kind]
            entry["bytes"] = path.stat().st_size
            entry["weight_bytes_per_token"] = _weight_bytes_per_token(path)
            # f32: float32 KV cache (the verification against HF); others: llama.cpp's default f16 KV cache
            llm = load_llama(path, n_ctx=seq_len, n_threads=threads, kv_f32=(kind == "f32"))
            try:
                nll = sum(window_nll(llama_cpp_logits(llm, w), w) for w in windows)
            finally:
                llm.close()
            entry["ppl"] = float(np.exp(nll / (windows.shape[0] * (seq_len - 1))))
        rows[name] = row
        print(json.dumps({name: row}), flush=True)

    # speed: interleave files within each repetition so machine load hits all of them alike
    runs_by_file: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    for rep in range(reps if speed else 0):
        for name in folders:
            for kind in kinds[1:]:
                runs_by_file.setdefault((name, kind), []).append(
                    _speed(files[(name, kind)], threads, pp, tg, seed=rep))
    for (name, kind), runs in runs_by_file.items():
        rows[name]["files"][kind]["pp_tok_s"] = statistics.median(r[0] for r in runs)
        rows[name]["files"][kind]["tg_tok_s"] = statistics.median(r[1] for r in runs)
        # best of the runs: on a shared machine the least-disturbed run is closest to the machine's speed
        rows[name]["files"][kind]["pp_tok_s_best"] = max(r[0] for r in runs)
        rows[name]["files"][kind]["tg_tok_s_best"] = max(r[1] for r in runs)
        rows[name]["files"][kind]["pp_tok_cpu_s"] = statistics.median(r[2] for r in runs)
        rows[name]["files"][kind]["tg_tok_cpu_s"] = statistics.median(r[3] for r in runs)
        rows[name]["files"][kind]["pp_runs"] = [round(r[0], 1) for r in runs]
        rows[name]["files"][kind]["tg_runs"] = [round(r[1], 1) for r in runs]
    machine["loadavg_at_end"] = os.getloadavg()
    result = {"machine": machine, "settings": {"threads": threads, "reps": reps, "pp": pp, "tg": tg,
                                               "ffn_multiple_for_quantisation": ffn_multiple,
                                               "eval_tokens": eval_tokens, "seq_len": seq_len,
                                               "plan": dataclasses.asdict(params.plan),
                                               "compensation": params.surgery.compensation,
                                               "calibration": dataclasses.asdict(params.calibrate)},
              "models": rows, "total_s": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(_table(result, kinds[1:]) + "\n")
    print(_table(result, kinds[1:]))


def _table(result: dict, kinds: list[str]) -> str:
    """The markdown table of results.json: one row per model and file type."""
    models = result["models"]
    dense = models["dense"]["files"]
    lines = ["| model | file | MB | WikiText-2 ppl (llama.cpp) | HF f32 ppl | prompt tok/s | gen tok/s | gen vs dense "
             "| gen tok/s (best) | best vs dense | gen tok/CPU-s | CPU-s vs dense |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in models.items():
        for kind in ["f32", *kinds]:
            f = row["files"][kind]
            speed = (f"{f['pp_tok_s']:.0f} | {f['tg_tok_s']:.1f} | {f['tg_tok_s'] / dense[kind]['tg_tok_s']:.2f}x | "
                     f"{f['tg_tok_s_best']:.1f} | {f['tg_tok_s_best'] / dense[kind]['tg_tok_s_best']:.2f}x | "
                     f"{f['tg_tok_cpu_s']:.1f} | {f['tg_tok_cpu_s'] / dense[kind]['tg_tok_cpu_s']:.2f}x"
                     if "tg_tok_s" in f else "| | | | | |")
            lines.append(f"| {name} ({row['arch']}, {row['params'] / 1e6:.1f}M) | {kind} | {f['bytes'] / 1e6:.1f} | "
                         f"{f['ppl']:.2f} | {row['hf_f32_ppl']:.2f} | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    app()
