"""GPU benchmark of the gqaprune pipeline steps on random-weight 7-8B shapes (LLaMA-3-8B, Qwen2.5-7B).

Measures, per preset, in one process (results written as JSON after every measurement, so a run cut
short still leaves what it measured):

* floors: bf16 matmul TFLOP/s, dense forward and forward+backward tokens/s at the scoring shapes;
* importance scoring (taylor + taylor_2nd in one pass, wanda) on a short set (default 128 x 128) and
  a long set (32 x 2048) over gradient_batch_size / gradient checkpointing settings: wall time,
  tokens/s, peak GPU memory, ratio to the floor;
* similarity (block_similarity), plan (build_plan), surgery + save_pruned;
* evaluation throughput: gqaprune.evaluation.perplexity fed random token ids through its token cache
  (no corpus, no tokenizer), and the same computation written inline (batched forward over
  non-overlapping windows + float32 token NLL, one host sync at the end);
* pruned-model speed: prefill and decode tokens/s of the dense model and of plans at two ratios and
  three MLP alignments. Decode replays one CUDA-graph-captured step over a static KV cache (falls back
  to, and always also reports, eager steps).

Weights are random (``gqaprune.models.random_models``); token ids are uniform random. Run it with the
package on the path::

    PYTHONPATH=src python benchmarks/gpu_8b.py --preset llama3-8b --out results/gpu_8b_llama3-8b.json

CPU smoke test::

    PYTHONPATH=src python benchmarks/gpu_8b.py --preset tiny-llama-gqa4 --device cpu --tiny --out /tmp/b.json

The measurements live in the package ``benchmarks/gpu`` (one module per purpose, see its ``__init__``);
this file is the command line.
"""

from __future__ import annotations

import time

from gpu.bench import Bench, environment
from gpu.options import parse
from gpu.preset import bench_preset


def main(argv=None):
    args = parse(argv, description=__doc__.split("\n\n")[0])
    t_start = time.perf_counter()
    for preset in args.preset or ["llama3-8b"]:
        bench = Bench(args, preset, t_start)
        bench.record("meta", "environment", environment(bench))
        bench_preset(bench, preset)
        bench.record("meta", "done", True)


if __name__ == "__main__":
    main()
