"""The N-rank side of tests/test_distributed.py: every library computation on tiny models, results to disk.

``python tests/dist_worker.py run --out DIR ...`` re-runs itself as 2 gloo ranks through
:func:`gqaprune.runtime.launch.launch` (the launcher the stages use) and rank 0 writes ``DIR/results.pt``;
the tests compare it with one process running the same library functions without a context.

``python tests/dist_worker.py fail --project DIR`` runs a stage through :func:`gqaprune.pipeline.runner.execute`
whose recipe raises on rank 1 while rank 0 waits in a collective (the error path of a real stage).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

SEQ = 12
N_SAMPLES = 9          # micro-batches of 2 -> 5 units (3 + 2 over two ranks: lock-step repeats when sharded)
GRAD_BATCH = 2
BATCH = 2
PPL_SEQ = 16
PPL_WINDOWS = 7        # 4 + 3 windows over two ranks
FT_PRESETS = ("tiny-llama-gqa4", "tiny-qwen2-gqa7")
CKPT_PRESET = "tiny-llama-gqa4"  # also scored with activation checkpointing, and loaded through a reference
MAX_SHARD = 24_000     # bytes: several checkpoint files even for tiny models
#: text the tests' tokenizer is trained on, with the instruction prompts (a LoRA example fits max_length)
PROMPT_TEXT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\n\n### Input:\n\n### Response:\n"
               "Give three tips for staying healthy. Eat a balanced diet. ") * 10


def samples(vocab: int) -> torch.Tensor:
    """The calibration samples every comparison uses: [N_SAMPLES, SEQ] token ids."""
    return torch.randint(0, vocab, (N_SAMPLES, SEQ), generator=torch.Generator().manual_seed(3))


def keep_for(config, uniform: bool = False):
    """A plan touching everything: layer 0 keeps half its KV groups and every 2nd MLP channel, layer 1 is
    removed, the last layer keeps a third of its MLP; ``uniform``: every layer the same halves."""
    from gqaprune.models.units import LayerKeep

    n, kv, inter = config.num_hidden_layers, config.num_key_value_heads, config.intermediate_size
    if uniform:
        return {i: LayerKeep(attn=list(range(max(kv // 2, 1))), mlp=list(range(inter // 2))) for i in range(n)}
    return {0: LayerKeep(attn=list(range(kv // 2)), mlp=list(range(0, inter, 2))),
            1: LayerKeep(attn=[], mlp=[]),
            n - 1: LayerKeep(attn=list(range(kv)), mlp=list(range(inter // 3)))}


def finetune_config():
    """Tiny LoRA settings: 3 examples a micro-batch (2 + 1 over two ranks), dropout 0 for exact equality."""
    from gqaprune.config.recovery_and_evaluation import FinetuneConfig

    return FinetuneConfig(dropout=0.0, lr=1e-2, max_length=96, batch_size=3, grad_accum=2, max_steps=3, epochs=3.0,
                          warmup_steps=1, n_records=8)


def instruction_records(data_dir):
    """Eight short Alpaca records (with and without input) from the local mirror."""
    from gqaprune.data.sources import load_instructions

    rows = load_instructions(data_dir=data_dir)
    return [r for r in rows if len(r["output"]) <= 200 and len(r["input"]) <= 100][:8]


def params_after(layout) -> int:
    """Parameters of a pruned layout's model (on the meta device)."""
    from gqaprune.models.adapters import get_adapter
    from gqaprune.models.groups import parameter_counts

    adapter = get_adapter(layout.model.config)
    return parameter_counts(layout.model, adapter, adapter.geometry(layout.model.config)).total


def computations(ctx, out: Path, tokenizer, data_dir, preset: str, source: Path, placement: str) -> dict:
    """Every library computation on one model (``ctx`` None: one process), its results and files under ``out``."""
    from gqaprune.evaluation.perplexity import perplexity
    from gqaprune.models.loading import load_model
    from gqaprune.pruning.compensation import compensate
    from gqaprune.pruning.importance import score_groups
    from gqaprune.pruning.similarity import block_similarity
    from gqaprune.pruning.surgery import pruned_layout, save_pruned
    from gqaprune.recovery.lora import finetune_lora, save_adapter
    from gqaprune.runtime.placement import is_dtensor

    tag = f"{preset}-{placement}"
    dense = load_model(source, "float32", "cpu", ctx, placement)
    r: dict = {"placement": dense.gqaprune_placement}
    ids = samples(dense.config.vocab_size)
    layers = dense.model.layers
    seen = []  # during the last layer's forward: is layer 0 sharded again already?
    hook = layers[-1].register_forward_hook(
        lambda m, a, o: seen.append(is_dtensor(layers[0].mlp.gate_proj.weight)))
    r["scores"] = score_groups(dense, ids, gradient_batch_size=GRAD_BATCH, progress=False, ctx=ctx)
    hook.remove()
    r["resharded_after_forward"] = bool(seen) and all(seen)
    r["all_sharded_after"] = all(is_dtensor(p) for p in dense.parameters())
    r["no_grad_after"] = all(p.grad is None for p in dense.parameters())
    if preset == CKPT_PRESET:
        r["scores_checkpointing"] = score_groups(dense, ids, gradient_batch_size=GRAD_BATCH,
                                                 gradient_checkpointing=True, progress=False, ctx=ctx)
    r["similarity"] = block_similarity(dense, ids, batch_size=BATCH, progress=False, ctx=ctx)
    keep = keep_for(dense.config)
    refits = compensate(dense, keep, ids, "lstsq", batch_size=BATCH, progress=False, ctx=ctx)
    r["refit_owners"] = dict(refits.owners)
    layout = pruned_layout(dense, keep, refits)
    r["report"] = layout.report
    save_pruned(dense, tokenizer, out / "pruned" / tag, {"test": tag, "params_after": params_after(layout)},
                keep, refits, ctx, max_shard_bytes=MAX_SHARD, layout_=layout)
    save_pruned(dense, None, out / "uniform" / tag, keep=keep_for(dense.config, uniform=True), ctx=ctx,
                max_shard_bytes=MAX_SHARD)
    del dense, refits
    pruned = load_model(out / "pruned" / tag, "float32", "cpu", ctx, placement)
    r["ppl"] = perplexity(pruned, tokenizer, "wikitext2", seq_len=PPL_SEQ, batch_size=BATCH,
                          max_tokens=PPL_SEQ * PPL_WINDOWS, data_dir=data_dir, ctx=ctx)
    if preset in FT_PRESETS:
        losses: list[float] = []
        peft_model = finetune_lora(pruned, tokenizer, instruction_records(data_dir), finetune_config(),
                                   log=lambda step, loss, lr: losses.append(loss), ctx=ctx)
        r["finetune_losses"] = losses
        save_pruned(peft_model, None, out / "merged" / tag, ctx=ctx, max_shard_bytes=MAX_SHARD)
        save_adapter(peft_model, out / "adapter" / tag, ctx)
    return r


def run(args) -> int:
    from transformers import AutoTokenizer

    from gqaprune.config.sections import DistributedParams
    from gqaprune.runtime.distributed import process_group
    from gqaprune.runtime.launch import launch

    code = launch(DistributedParams(nproc_per_node=args.nproc, timeout_s=args.timeout), [__file__, *sys.argv[1:]])
    if code is not None:  # the launching process: torchrun ran the ranks
        return code
    torch.set_num_threads(1)
    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    with process_group("cpu", args.timeout) as ctx:
        start = time.perf_counter()
        results: dict = {"world_size": ctx.world_size}
        for preset in args.presets:
            for placement in args.placements:
                source = out / "dense" / (f"{preset}-ref" if preset == CKPT_PRESET else preset)
                results[f"{preset}-{placement}"] = computations(ctx, out / "ranks", tokenizer, args.data_dir, preset,
                                                                source, placement)
        results["seconds"] = time.perf_counter() - start
        if ctx.is_main:
            torch.save(results, out / "results.pt")
    return 0


def fail(args) -> int:
    """A stage whose recipe raises on rank 1 while rank 0 waits in a collective."""
    from gqaprune.pipeline.runner import execute

    def recipe(params, out, ctx):
        out("artifacts/scores").mkdir(parents=True)
        (out("artifacts/scores") / "partial.txt").write_text("written before the failure")
        if ctx.rank == 1:
            time.sleep(1.0)
            raise RuntimeError("deliberate failure on rank 1")
        ctx.all_reduce_(torch.ones(1))  # rank 1 never joins: the job must end anyway

    os.chdir(args.project)
    overrides = ["distributed.nproc_per_node=2", f"distributed.timeout_s={args.timeout}", "score.device=cpu"]
    return execute("score", recipe, Path("params.yaml"), overrides, False,
                   argv=[__file__, "fail", "--project", args.project, "--timeout", str(args.timeout)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--tokenizer", required=True)
    r.add_argument("--data-dir", required=True)
    r.add_argument("--nproc", type=int, default=2)
    r.add_argument("--presets", nargs="*", default=[])
    r.add_argument("--placements", nargs="*", default=["replicate", "shard"])
    r.add_argument("--timeout", type=float, default=120.0)
    f = sub.add_parser("fail")
    f.add_argument("--project", required=True)
    f.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    return run(args) if args.cmd == "run" else fail(args)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    sys.exit(main())
