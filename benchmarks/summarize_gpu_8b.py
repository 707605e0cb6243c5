"""Print the tables of GPU_8B.md from the raw JSON written by gpu_8b.py.

    python benchmarks/summarize_gpu_8b.py benchmarks/results/gpu_8b_llama3-8b.json [more.json ...]

Ratios: a step's wall time over the time the best measured dense floor (no checkpointing) needs for
the same tokens: forward+backward floor for taylor, forward floor for wanda and similarity.
"""

from __future__ import annotations

import json
import sys


def best(floors: dict, prefix: str) -> tuple[float, str]:
    rows = [
        (v["tokens_per_s"], k)
        for k, v in floors.items()
        if k.startswith(prefix) and "tokens_per_s" in v and not v.get("checkpointing")
    ]
    return max(rows)


def ok(flag: bool) -> str:
    return "met" if flag else "missed"


def summarize(path: str) -> None:
    d = json.load(open(path))
    preset = d["model"]["info"]["preset"]
    print(f"\n### {preset}  ({path})\n")
    fl = d.get("floors", {})
    if fl:
        print(f"matmul 8192^3 bf16: {fl['matmul']['tflops']:.0f} TFLOP/s")
        for k, v in fl.items():
            if "tokens_per_s" in v:
                print(f"  floor {k}: {v['tokens_per_s']:,.0f} tok/s, peak {v['peak_gib']:.1f} GiB")
    shapes = {"short": None, "long": None}
    for section, floor_prefix in (
        ("taylor", "fwdbwd"),
        ("taylor_baseline_head", "fwdbwd"),
        ("wanda", "fwd_"),
        ("wanda_baseline_head", "fwd_"),
        ("similarity", "fwd_"),
        ("similarity_baseline_head", "fwd_"),
    ):
        for k, v in d.get(section, {}).items():
            if "wall_s" not in v:
                print(f"| {section} {k} | {v} |")
                continue
            name = k.split("_")[0]
            prefix = f"{floor_prefix}{'_' if floor_prefix == 'fwdbwd' else ''}{name}"
            tps, fk = best(fl, prefix)
            n, s = v["samples"]
            tokens = n * s
            ratio = v["wall_s"] / (tokens / tps)
            shapes[name] = (n, s)
            setting = k.split("_", 1)[1]
            print(
                f"| {section} {n}x{s} {setting} | {v['wall_s']:.2f} s | {v['tokens_per_s']:,.0f} tok/s "
                f"| {v['peak_gib']:.1f} GiB | {ratio:.2f}x of {fk} |"
            )
    for k, v in d.get("plan", {}).items():
        print(
            f"| plan {k} | {v['wall_s']:.2f} s | ratio_total {v['ratio_total']:.4f} | "
            f"removed {v['groups_removed']} layers {v['removed_layers']} |"
        )
    for k, v in d.get("surgery", {}).items():
        line = (
            f"| surgery {k} | prune {v['prune_model_s']:.3f} s | params {v['params']:,} "
            f"| layers {v['layers']} "
        )
        if "save_pruned_s" in v:
            total = v["surgery_plus_save_s"]
            line += (
                f"| save {v['save_pruned_s']:.1f} s, os.sync {v['os_sync_s']:.1f} s, "
                f"{v['saved_gib']:.1f} GiB | total {total:.1f} s ({ok(total < 30)})"
            )
        print(line + " |")
    for k, v in d.get("eval", {}).items():
        tps = v["tokens_per_s"]
        print(f"| eval {k} | {tps:,.0f} tok/s ({ok(tps >= 25000)}) | peak {v['peak_gib']:.1f} GiB |")
    for section in ("speed", "align"):
        sp = d.get(section, {})
        dense = d.get("speed", {}).get("dense_prefill", {}).get("tokens_per_s")
        dense_dec = {b: d.get("speed", {}).get(f"dense_decode_b{b}", {}) for b in (1, 32)}
        for k, v in sp.items():
            if k.endswith("prefill") and "tokens_per_s" in v:
                tps = v["tokens_per_s"]
                print(f"| {section} {k} | {tps:,.0f} tok/s | {tps / dense:.3f}x dense |")
            elif "decode" in k and "eager_tokens_per_s" in v:
                b = v["batch"]
                g = v.get("graph_tokens_per_s")
                gd = dense_dec[b].get("graph_tokens_per_s")
                print(
                    f"| {section} {k} | eager {v['eager_tokens_per_s']:,.0f} tok/s | graph "
                    f"{g:,.0f} tok/s | {g / gd:.2f}x dense graph |"
                    if g and gd
                    else f"| {section} {k} | {v} |"
                )
            elif "surgery" in k:
                print(f"| {section} {k} | {v} |")
    if "hookbench" in d:
        print(json.dumps(d["hookbench"], indent=1))


if __name__ == "__main__":
    for p in sys.argv[1:]:
        summarize(p)
