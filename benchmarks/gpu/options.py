"""The command line of gpu_8b.py: each option's default and its ``--tiny`` (CPU smoke test) value side by side."""

from __future__ import annotations

import argparse

# (option, default, value under --tiny or None to keep the default, help); the type is the default's
OPTIONS = (
    ("device", "cuda", None, None),
    ("dtype", "bfloat16", None, None),
    ("out", "benchmarks/results/gpu_8b.json", None, "JSON path; the preset is appended"),
    ("sections", "floors,taylor,wanda,similarity,profile,plan,speed,surgery,eval", None, None),
    ("time-budget-s", 0.0, None, "skip remaining measurements after this"),
    ("baseline-dir", "", None, "folder with importance_head.py / similarity_head.py"),
    ("short", "128x128", "8x16", None),
    ("long", "32x2048", "4x64", None),
    ("matmul-n", 8192, 256, None),
    ("floor-iters", 3, 1, None),
    ("fwd-short", "4,32,128", "4,8", None),
    ("fwd-long", "1,4,8", "1,4", None),
    ("fwdbwd-short", "4,16,32,64c", "4,8c", None),
    ("fwdbwd-long", "1,2,4c", "1,2c", None),
    ("taylor-short", "4,16,32,32c,64c,128c", "2,8c", None),
    ("taylor-long", "1,2,4c,8c", "1,2c", None),
    ("baseline-taylor-short", "4,32c", "2", None),
    ("baseline-taylor-long", "1", "1", None),
    ("wanda-short", "4,32,128", "4", None),
    ("wanda-long", "1,4,8", "2", None),
    ("baseline-wanda-short", "32", "4", None),
    ("baseline-wanda-long", "", None, None),
    ("sim-short", "8,32", "4", None),
    ("sim-long", "2,8", "2", None),
    ("baseline-sim-short", "", "4", None),
    ("baseline-sim-long", "", None, None),
    ("profile-out", "", None, None),
    ("profile-gbs", 32, 2, None),
    ("ratios", "0.2,0.3", None, None),
    ("aligns", "1,8,64", None, None),
    ("save-dir", "/tmp/gqaprune_bench", None, None),
    ("prefill-shape", "8x2048", "2x64", None),
    ("prefill-iters", 5, None, None),
    ("decode-batches", "1,32", None, None),
    ("decode-ctx", 512, 16, None),
    ("decode-steps", 100, 4, None),
    ("eager-decode-steps", 20, 4, None),
    ("eval", "128:8,128:32,2048:8", "16:4,64:2", "seq_len:batch_size pairs"),
    ("eval-tokens", 131072, 512, None),
    ("uniform", "8:11469,8:11472,8:11520,6:11776", "2:95,2:88,1:64",
     "kv:mlp pairs for the uniform-prune alignment section"),
    ("hookbench-compile", 1, None, None),
)


def parse(argv, description: str) -> argparse.Namespace:
    """Parsed options; under --tiny the sizes are replaced by their tiny values; lists split into numbers."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", action="append", help="random_models preset (repeatable); default llama3-8b")
    for name, default, _, text in OPTIONS:
        p.add_argument(f"--{name}", type=type(default), default=default, help=text)
    p.add_argument("--tiny", action="store_true", help="small sizes for a CPU smoke test")
    args = p.parse_args(argv)
    if args.tiny:
        for name, _, tiny, _ in OPTIONS:
            if tiny is not None:
                setattr(args, name.replace("-", "_"), tiny)
    args.ratios = [float(x) for x in args.ratios.split(",")]
    args.aligns = [int(x) for x in args.aligns.split(",")]
    args.decode_batches = [int(x) for x in args.decode_batches.split(",")]
    args.eval_settings = [tuple(int(v) for v in item.split(":")) for item in args.eval.split(",") if item]
    return args
