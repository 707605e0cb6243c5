"""N processes (torchrun, 2 gloo ranks on CPU) give the one-process results, for every tiny family preset.

One 2-rank job (``tests/dist_worker.py``, started through :func:`gqaprune.runtime.launch.launch`, the stages'
launcher) loads each preset replicated and FSDP2-sharded (one of them through a prepared model's
reference to its folder) and runs the library functions with its context: scores (all five metrics, and
with activation checkpointing), similarity, least-squares compensation, the pruned checkpoint written one
layer at a time, perplexity, LoRA finetuning (DDP / FSDP2) and the merged checkpoint. The reference is the
same function (``dist_worker.computations``) in this process without a context. Tolerances (float32):

* scores: relative 1e-5 per group (float32 accumulators added up in another order);
* similarity: absolute 1e-7;
* pruned checkpoint: same files, index and config; tensors relative 1e-6; reloaded logits 1e-5;
* perplexity: relative 1e-6; LoRA loss curve: absolute 1e-5 per step; merged weights relative 1e-5.

Then real stage commands on the tiny project with ``-S distributed.nproc_per_node=2`` (score sharded,
surgery replicated) give the one-process artifacts, and a rank failing in a stage ends the job at once
with one error line. Every subprocess has a deadline and the collectives a timeout, so a hang fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import dist_worker as W
from gqaprune.config.loading import parse_params
from gqaprune.config.rules import ParamsError
from gqaprune.config.sections import DistributedParams
from gqaprune.models.random_models import TINY_PRESETS, build_model
from gqaprune.runtime.distributed import DistContext, shard_range, single_process
from gqaprune.runtime.launch import launch, torchrun_command
from gqaprune.runtime.placement import choose_placement, local_rows
from helpers import SAMPLE_TEXT, bpe_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"
METRICS = ("magnitude", "wanda", "taylor", "taylor_2nd", "fluctuation")
CASES = [(p, pl) for p in TINY_PRESETS for pl in ("replicate", "shard")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread here, as each rank has: tiny models gain nothing from more, and on a busy 2-core
    runner OpenMP threads waiting for each other make them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Pure helpers (no processes)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("n", [0, 1, 5, 9, 64])
def test_shares_partition_in_order_and_balance(n, world):
    shares = [shard_range(n, world, r) for r in range(world)]
    assert [i for s in shares for i in s] == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_lockstep_units_repeat_a_real_one_inactive():
    ranks = [DistContext(rank=r, world_size=2) for r in range(2)]
    assert ranks[0].split_units(5, lockstep=True) == [(0, True), (1, True), (2, True)]
    assert ranks[1].split_units(5, lockstep=True) == [(3, True), (4, True), (3, False)]
    assert ranks[1].split_units(5) == [(3, True), (4, True)]
    assert ranks[1].split_units(1, lockstep=True) == [(0, False)]  # an empty share repeats unit 0
    # batches are the batches of one process, dealt out: 9 items in 2s -> [0:2] [2:4] [4:6] | [6:8] [8:9]
    assert ranks[1].batches(9, 2, lockstep=True) == [(slice(6, 8), True), (slice(8, 9), True), (slice(6, 8), False)]
    assert single_process().batches(5, 2) == [(slice(0, 2), True), (slice(2, 4), True), (slice(4, 5), True)]


def test_single_process_context_is_inert():
    ctx = single_process()
    t = torch.tensor([1.0, 2.0])
    ctx.all_reduce_(t)
    ctx.reduce_to_(t, 0)
    ctx.broadcast_(t)
    ctx.barrier()
    ctx.agree(True)
    with ctx.main_first():
        pass
    assert t.tolist() == [1.0, 2.0] and ctx.broadcast_object({"a": 1}) == {"a": 1}
    assert ctx.shard(5) == range(5) and ctx.is_main and not ctx.is_distributed
    with pytest.raises(RuntimeError, match="broken"):
        ctx.agree(False, "broken")


def test_fsdp_row_split_is_torch_chunk():
    for rows in (0, 1, 7, 64, 65):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(rows).chunk(world) if rows else ()
            for r in range(world):
                start, stop = local_rows(rows, world, r)
                assert list(range(start, stop)) == (chunks[r].tolist() if r < len(chunks) else [])


def test_torchrun_command_one_host_and_several(monkeypatch):
    argv = ["-m", "gqaprune.pipeline.runner", "score", "--set", "plan.ratio=0.3"]
    assert torchrun_command(DistributedParams(nproc_per_node=4), argv) == [
        "torchrun", "--nproc_per_node=4", "--standalone", "-m", "--", "gqaprune.pipeline.runner", "score", "--set",
        "plan.ratio=0.3"]
    two = torchrun_command(DistributedParams(nproc_per_node=8, nnodes=2, rdzv_endpoint="node0:29500",
                                             rdzv_id="job7"), ["stages/score.py"])
    assert two == ["torchrun", "--nproc_per_node=8", "--nnodes=2", "--rdzv_backend=c10d",
                   "--rdzv_endpoint=node0:29500", "--rdzv_id=job7", "--", "stages/score.py"]
    # one process asked for, already a rank, or told not to: run in this process
    assert launch(DistributedParams(nproc_per_node=1), ["x.py"]) is None
    monkeypatch.setenv("GQAPRUNE_NO_LAUNCH", "1")
    assert launch(DistributedParams(nproc_per_node=4), ["x.py"]) is None
    monkeypatch.delenv("GQAPRUNE_NO_LAUNCH")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launch(DistributedParams(nproc_per_node=4), ["x.py"]) is None


def test_distributed_params_are_validated_with_the_others():
    assert parse_params({"distributed": {"nproc_per_node": 4}}).distributed.processes == 4
    with pytest.raises(ParamsError) as e:
        parse_params({"distributed": {"nproc": 4, "placement": "pipeline"}})
    assert "unknown key distributed.nproc" in str(e.value)
    with pytest.raises(ParamsError) as e:
        parse_params({"distributed": {"nnodes": 2, "placement": "pipeline", "nproc_per_node": 0}})
    for key in ("rdzv_endpoint", "placement", "nproc_per_node"):
        assert f"distributed.{key}" in str(e.value)
    with pytest.raises(ParamsError, match="distributed.node_rank"):
        parse_params({"distributed": {"nnodes": 2, "rdzv_endpoint": "h:1", "rdzv_backend": "static"}})


def test_placement_rule():
    two = DistContext(rank=0, world_size=2, local_world_size=2)
    assert choose_placement("auto", 10, single_process()) == "replicate"
    assert choose_placement("shard", 10, single_process()) == "replicate"  # nothing to shard over
    assert choose_placement("auto", 10, two) == "replicate"
    assert choose_placement("auto", 1 << 61, two) == "shard"
    assert choose_placement("replicate", 1 << 61, two) == "replicate"


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_taps_equal_per_micro_batch_autograd(preset):
    """One process: the taps' Taylor scores are sum_b |w g_b| with autograd's own g_b (no .grad left behind)."""
    import copy

    from gqaprune.models.adapters import get_adapter
    from gqaprune.models.groups import layer_shapes
    from gqaprune.pruning.importance import _members, score_groups

    model = build_model(preset)
    ids = W.samples(128)
    got = score_groups(model, ids, metrics=["taylor", "taylor_2nd"], gradient_batch_size=4, progress=False)
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())
    adapter = get_adapter(model.config)
    shapes = layer_shapes(model, adapter, adapter.geometry(model.config))
    want: dict = {}
    for start in range(0, ids.shape[0], 4):
        ref = copy.deepcopy(model)
        ref(input_ids=ids[start:start + 4], labels=ids[start:start + 4]).loss.backward()
        for s in shapes:
            for kind, p, _, reduce in _members(adapter.layers(ref)[s.layer], adapter, s):
                wg = (p.detach() * p.grad).double()
                first, second = reduce(wg.abs()), reduce(wg.square())
                for metric, value in (("taylor", first), ("taylor_2nd", first + 0.5 * second)):
                    key = (s.layer, kind, metric)
                    want[key] = want[key] + value if key in want else value
    for metric in ("taylor", "taylor_2nd"):
        expected = torch.cat([want[(s.layer, kind, metric)] for s in shapes for kind in ("attn", "mlp")
                              if (s.layer, kind, metric) in want]).numpy()
        np.testing.assert_allclose(got[metric].to_numpy(), expected, rtol=1e-5, err_msg=metric)


def test_merged_lora_checkpoint_equals_peft_merge(tmp_path, data_dir):
    """One process: save_pruned of a peft model (merged layer by layer) = merge_and_unload + save, byte for byte."""
    from gqaprune.pruning.surgery import save_pruned
    from gqaprune.recovery.lora import finetune_lora, merge_adapter

    tok = bpe_tokenizer([SAMPLE_TEXT + W.PROMPT_TEXT], 400, eos=True, model_max_length=128)
    model = build_model("tiny-qwen2-gqa7", vocab_size=len(tok))
    peft_model = finetune_lora(model, tok, W.instruction_records(data_dir), W.finetune_config())
    save_pruned(peft_model, None, tmp_path / "layered", {"x": 1}, max_shard_bytes=W.MAX_SHARD)
    save_pruned(merge_adapter(peft_model), None, tmp_path / "peft", {"x": 1}, max_shard_bytes=W.MAX_SHARD)
    files = sorted(p.name for p in (tmp_path / "peft").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "layered").iterdir())
    for name in files:
        assert (tmp_path / "peft" / name).read_bytes() == (tmp_path / "layered" / name).read_bytes(), name


# ----------------------------------------------------------------------------------------------
# Two ranks against one process
# ----------------------------------------------------------------------------------------------
def _run(cmd: list[str], deadline: float, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; kill the whole group at the deadline (a hang fails the test)."""
    proc = subprocess.Popen(cmd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=cwd)
    try:
        out, err = proc.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish within {deadline} s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "GQAPRUNE_NO_LAUNCH", "GQAPRUNE_LAUNCHER", "GQAPRUNE_DEBUG"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tokenizer and every preset's dense checkpoint in several safetensors files (one also as a reference)."""
    from gqaprune.models.sources import write_reference

    root = tmp_path_factory.mktemp("dist")
    tok = bpe_tokenizer([SAMPLE_TEXT, W.PROMPT_TEXT], 400, eos=True, model_max_length=128)
    tok.save_pretrained(root / "tokenizer")
    for preset in TINY_PRESETS:
        build_model(preset, vocab_size=len(tok)).save_pretrained(root / "dense" / preset, max_shard_size="40KB")
    write_reference(root / "dense" / W.CKPT_PRESET, root / "dense" / f"{W.CKPT_PRESET}-ref", "test")
    return root


@pytest.fixture(scope="module")
def two_ranks(models, data_dir):
    """The worker on 2 gloo ranks, once: its results."""
    cmd = [sys.executable, str(WORKER), "run", "--out", str(models), "--tokenizer", str(models / "tokenizer"),
           "--data-dir", str(data_dir), "--presets", *TINY_PRESETS]
    start = time.perf_counter()
    done = _run(cmd, deadline=600)
    assert done.returncode == 0, done.stderr[-6000:]
    results = torch.load(models / "results.pt", weights_only=False)
    results["wall_s"] = time.perf_counter() - start
    return results


@pytest.fixture(scope="module")
def reference(models, data_dir):
    """The same computations in this process, without a context (one process)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models / "tokenizer")
    return {preset: W.computations(None, models / "single", tok, data_dir, preset, models / "dense" / preset,
                                   "replicate") for preset in TINY_PRESETS}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _same_checkpoint(got: Path, want: Path, rtol: float) -> None:
    a, b = _tensors(got), _tensors(want)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=rtol * float(b[name].abs().max()), msg=name)
    configs = [json.loads((p / "config.json").read_text()) for p in (got, want)]
    infos = [c.pop("gqaprune_info", {}) for c in configs]
    assert configs[0] == configs[1]
    assert infos[0].get("params_after") == infos[1].get("params_after")
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("preset,placement", CASES)
def test_scores_equal_one_process(two_ranks, reference, preset, placement):
    got, want = two_ranks[f"{preset}-{placement}"], reference[preset]
    assert two_ranks["world_size"] == 2 and got["placement"] == placement
    # sharded: every layer was resharded after its forward, all weights are shards again; never a gradient
    assert got["resharded_after_forward"] == got["all_sharded_after"] == (placement == "shard")
    assert got["no_grad_after"]
    for table_key in ("scores", "scores_checkpointing"):
        if table_key not in want:
            continue
        table, expected = got[table_key], want[table_key]
        pd.testing.assert_frame_equal(table[["layer", "kind", "index", "cost"]],
                                      expected[["layer", "kind", "index", "cost"]])
        for metric in METRICS:
            np.testing.assert_allclose(table[metric].to_numpy(), expected[metric].to_numpy(), rtol=1e-5,
                                       atol=1e-9 * float(np.abs(expected[metric]).max()), err_msg=metric)


@pytest.mark.slow
@pytest.mark.parametrize("preset,placement", CASES)
def test_similarity_equals_one_process(two_ranks, reference, preset, placement):
    got, want = two_ranks[f"{preset}-{placement}"]["similarity"], reference[preset]["similarity"]
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=0, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("preset,placement", CASES)
def test_pruned_checkpoint_equals_one_process(two_ranks, reference, models, preset, placement):
    from gqaprune.models.loading import load_model

    got, want = two_ranks[f"{preset}-{placement}"], reference[preset]
    assert got["report"] == want["report"]
    assert got["refit_owners"].keys() == want["refit_owners"].keys()
    assert set(got["refit_owners"].values()) == ({0, 1} if len(want["refit_owners"]) > 1 else {0})
    tag = f"{preset}-{placement}"
    folder, single = models / "ranks" / "pruned" / tag, models / "single" / "pruned" / f"{preset}-replicate"
    _same_checkpoint(folder, single, rtol=1e-6)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n > 1 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert (folder / "tokenizer.json").exists()
    ids = W.samples(128)
    with torch.no_grad():
        a, b = load_model(folder).eval(), load_model(single).eval()
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=0, atol=1e-5)
    _same_checkpoint(models / "ranks" / "uniform" / tag, models / "single" / "uniform" / f"{preset}-replicate", rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("preset,placement", CASES)
def test_perplexity_equals_one_process(two_ranks, reference, preset, placement):
    got, want = two_ranks[f"{preset}-{placement}"]["ppl"], reference[preset]["ppl"]
    assert (got.n_windows, got.n_tokens, got.capped) == (want.n_windows, want.n_tokens, want.capped) == (
        W.PPL_WINDOWS, W.PPL_WINDOWS * W.PPL_SEQ, True)
    assert got.ppl == pytest.approx(want.ppl, rel=1e-6)
    assert got.log_ppl_se == pytest.approx(want.log_ppl_se, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("preset,placement", [(p, pl) for p, pl in CASES if p in W.FT_PRESETS])
def test_lora_loss_curve_equals_one_process(two_ranks, reference, models, preset, placement):
    got, want = two_ranks[f"{preset}-{placement}"]["finetune_losses"], reference[preset]["finetune_losses"]
    assert len(got) == len(want) == W.finetune_config().max_steps
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    tag = f"{preset}-{placement}"
    # The ranks add their gradients in another order than one process (float32); AdamW divides each update by
    # the gradient's running RMS, which magnifies that noise on elements whose gradient is near zero: measured
    # 4.2e-4 of a tensor's largest value on the LoRA matrices after 3 steps at lr 1e-2, 3.2e-5 on the merged
    # weights (base + B A alpha / r). A wrong split of the examples moves them by the lr itself (1e-2).
    _same_checkpoint(models / "ranks" / "merged" / tag, models / "single" / "merged" / f"{preset}-replicate",
                     rtol=1e-4)
    a = _tensors(models / "ranks" / "adapter" / tag)
    b = _tensors(models / "single" / "adapter" / f"{preset}-replicate")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=2e-3 * float(b[name].abs().max()), msg=name)


# ----------------------------------------------------------------------------------------------
# Real stage commands
# ----------------------------------------------------------------------------------------------
def _stage(project: Path, stage: str, *sets: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "stages" / f"{stage}.py"), *[a for s in sets for a in ("-S", s)]]
    return _run(cmd, deadline=300, cwd=project)


@pytest.mark.slow
def test_stages_on_two_processes_write_the_one_process_artifacts(project):
    """score (sharded) and surgery (replicated, lstsq refits) on 2 gloo ranks = the same stages in one process."""
    from gqaprune.pipeline.artifacts import read_table
    from gqaprune.pipeline.runner import execute

    two = ["distributed.nproc_per_node=2", "distributed.timeout_s=120", "score.metrics=[taylor, taylor_2nd, "
           "wanda, magnitude, fluctuation]", "score.gradient_batch_size=3"]
    one_table = project / "one.parquet"
    assert execute("score", None, Path("params.yaml"), two[2:], False) == 0
    shutil.copy(project / "artifacts/scores/importance.parquet", one_table)
    done = _stage(project, "score", *two, "distributed.placement=shard")
    assert done.returncode == 0, done.stderr[-4000:]
    got, got_meta = read_table(project / "artifacts/scores/importance.parquet")
    want, want_meta = read_table(one_table)
    assert got_meta == want_meta
    for metric in METRICS:
        np.testing.assert_allclose(got[metric], want[metric], rtol=1e-5, err_msg=metric)
    assert "[rank 1]" not in done.stderr and "[score]" in done.stderr  # the console is rank 0's
    assert "params:" in (project / "artifacts/logs/score.rank1.log").read_text()
    assert not list(project.rglob("*.staged*")) and not list(project.rglob("*.error.json"))

    assert execute("allocate", None, Path("params.yaml"), [], False) == 0  # on the scores it plans with
    assert execute("plan", None, Path("params.yaml"), [], False) == 0
    assert execute("surgery", None, Path("params.yaml"), [], False) == 0
    shutil.copytree(project / "artifacts/pruned", project / "one-pruned")
    done = _stage(project, "surgery", *two[:2])
    assert done.returncode == 0, done.stderr[-4000:]
    _same_checkpoint(project / "artifacts/pruned", project / "one-pruned", rtol=1e-6)
    metrics = json.loads((project / "metrics/surgery.json").read_text())
    assert metrics["processes"] == 2


@pytest.mark.slow
def test_a_failing_rank_ends_the_stage_with_one_line(tmp_path):
    """Rank 1's recipe raises while rank 0 waits in a collective: non-zero exit at once, one error line,
    nothing committed, nothing staged left behind."""
    (tmp_path / "params.yaml").write_text("{}\n")
    cmd = [sys.executable, str(WORKER), "fail", "--project", str(tmp_path), "--timeout", "300"]
    start = time.perf_counter()
    done = _run(cmd, deadline=240)
    elapsed = time.perf_counter() - start
    record = json.loads((tmp_path / "artifacts/logs/score.rank1.error.json").read_text())
    ended_after = time.time() - record["time"]
    print(f"the job ended {ended_after:.1f} s after the failure ({elapsed:.1f} s in all)")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and "rank 1" in errors[0] and "deliberate failure on rank 1" in errors[0], \
        done.stderr[-3000:]
    assert ended_after < 60
    assert not (tmp_path / "artifacts/scores").exists() and not list(tmp_path.rglob("*.staged*"))
    assert "deliberate failure" in (tmp_path / "artifacts/logs/score.rank1.log").read_text()


@pytest.mark.slow
def test_benchmark_dry_run_on_cpu(tmp_path):
    """benchmarks/dist_bench.py: a random checkpoint written tensor by tensor, every section on 2 gloo ranks."""
    bench = str(REPO / "benchmarks" / "dist_bench.py")
    done = _run([sys.executable, bench, "make", "--preset", "tiny-qwen2-gqa7", "--out", str(tmp_path / "model"),
                 "--dtype", "float32", "--shard-gib", "0.00003"], deadline=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "model").glob("*.safetensors"))) > 1
    out = tmp_path / "bench.json"
    done = _run([sys.executable, bench, "run", "--model", str(tmp_path / "model"), "--device", "cpu", "--dtype",
                 "float32", "--nproc", "2", "--placement", "shard", "--samples", "6", "--seq", "16",
                 "--gradient-batch-size", "2", "--batch-size", "2", "--eval-windows", "6", "--eval-seq", "16",
                 "--pruned-out", str(tmp_path / "pruned"), "--timeout", "120", "--json", str(out)], deadline=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["placement"] == "shard"
    for section in ("load", "floor", "score", "similarity", "surgery", "evaluate"):
        assert section in result, section
    assert len(result["load"]["memory"]) == 2 and result["surgery"]["refits"] > 0
    assert (tmp_path / "pruned" / "config.json").exists()
