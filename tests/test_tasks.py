"""Task evaluation through lm-eval (gqaprune.evaluation.tasks) on a local multiple-choice task made here.

The task (``toy_mc``): 20 documents in a JSONL file, read by datasets' ``json`` builder through a YAML in
a temporary include folder, so nothing comes from the hub. Models are tiny random LLaMAs (dense, and a
pruned checkpoint with a removed layer and emptied blocks reloaded by ``load_model``). Two gloo ranks
run through this file's own worker (``python tests/test_tasks.py worker ...``, started with the stages'
launcher) and must give the one-process numbers.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gqaprune.errors import InputError  # noqa: E402
from gqaprune.evaluation import tasks as T  # noqa: E402
from helpers import small_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
N_DOCS = 20
WORDS = "red blue green the television actor stock exchange colors guest role series fall apart".split()
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
{metrics}"""


def docs() -> list[dict]:
    """20 questions of 2-4 choices of different lengths (acc_norm and acc can differ), seeded."""
    rng = random.Random(0)
    out = []
    for i in range(N_DOCS):
        choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(2 + i % 3)]
        out.append({"question": " ".join(rng.choice(WORDS) for _ in range(6)), "choices": choices,
                    "label": i % len(choices)})
    return out


def make_include(folder: Path) -> Path:
    """The include folder: toy_mc (acc, acc_norm), toy_acc (acc only) and three tasks that are not local."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs()))
    both = "  - metric: acc\n  - metric: acc_norm\n"
    (folder / "toy_mc.yaml").write_text(TASK_YAML.format(name="toy_mc", data=data, metrics=both))
    (folder / "toy_acc.yaml").write_text(TASK_YAML.format(name="toy_acc", data=data, metrics="  - metric: acc\n"))
    remote = {"toy_hub": ("someone/some_dataset", data), "toy_url": ("json", "https://example.com/d.jsonl"),
              "toy_missing": ("json", folder / "absent.jsonl")}
    for name, (path, files) in remote.items():
        text = TASK_YAML.format(name=name, data=files, metrics=both).replace("dataset_path: json",
                                                                           f"dataset_path: {path}")
        (folder / "offline").mkdir(exist_ok=True)
        (folder / "offline" / f"{name}.yaml").write_text(text)
    return folder


@pytest.fixture(scope="module")
def include(tmp_path_factory) -> str:
    return str(make_include(tmp_path_factory.mktemp("lmeval") / "tasks"))


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from gqaprune.models.random_models import build_model

    return build_model("tiny-llama-gqa4", vocab_size=len(tok))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, model, tok):
    """The tiny model pruned (layer 1 removed, emptied / halved blocks), saved and reloaded by load_model."""
    from gqaprune.models.loading import load_model
    from gqaprune.models.units import LayerKeep
    from gqaprune.pruning.surgery import save_pruned

    c = model.config
    keep = {0: LayerKeep(attn=list(range(c.num_key_value_heads // 2)), mlp=list(range(0, c.intermediate_size, 2))),
            1: LayerKeep(attn=[], mlp=[]), 2: LayerKeep(attn=[], mlp=list(range(8)))}
    out = save_pruned(model, tok, tmp_path_factory.mktemp("pruned") / "model", keep=keep)
    return load_model(out, "float32", "cpu")


# ----------------------------------------------------------------------------------------------
# Names, metrics, offline
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow  # lm-eval indexes its ~14k task YAMLs once (10-25 s)
def test_suite_expansion_and_metric_convention(include):
    got = T.resolve_tasks(["zeroshot7", "toy_mc", "toy_acc", "boolq", "lambada_openai", "gsm8k"], include)
    assert list(got) == ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa",
                         "toy_mc", "toy_acc", "lambada_openai", "gsm8k"]  # suite order, duplicates once
    assert {t: got[t] for t in T.SUITES["zeroshot7"]} == T.SUITES["zeroshot7"]
    assert [got[t] for t in ("boolq", "piqa", "winogrande", "arc_easy")] == ["acc", "acc_norm", "acc", "acc_norm"]
    # outside suites: acc_norm when reported, else acc, else the first metric
    assert (got["toy_mc"], got["toy_acc"], got["lambada_openai"], got["gsm8k"]) == ("acc_norm", "acc", "acc",
                                                                                    "exact_match")


@pytest.mark.slow  # the full index again (cached per process after the first test)
def test_unknown_task_refused_by_name_with_close_matches(include):
    with pytest.raises(InputError) as err:
        T.resolve_tasks(["piqa", "boolqq", "toy_mcc"], include)
    message = str(err.value)
    assert "\n" not in message and message.startswith("evaluate.tasks")
    assert "'boolqq' (close: boolq" in message and "'toy_mcc' (close: toy_mc" in message and "'piqa'" not in message


def test_local_tasks_resolve_without_lm_evals_own_index(include):
    start = time.perf_counter()
    assert T.resolve_tasks(["toy_mc", "toy_acc"], include) == {"toy_mc": "acc_norm", "toy_acc": "acc"}
    assert time.perf_counter() - start < 10  # the include folder alone, not lm-eval's 14k YAMLs
    for bad in ("piqa", ["piqa", ""], [3]):
        with pytest.raises(InputError, match="evaluate.tasks"):
            T.resolve_tasks(bad, include)
    with pytest.raises(InputError, match="evaluate.task_include_path"):
        T.resolve_tasks(["toy_mc"], include + "/nowhere")


def test_offline_hub_task_refused_in_under_a_second(monkeypatch, include):
    monkeypatch.setattr(T, "hub_reachable", lambda: False)
    start = time.perf_counter()
    with pytest.raises(InputError) as err:
        T.check_offline(["toy_mc", "hellaswag"], include)
    elapsed = time.perf_counter() - start
    message = str(err.value)
    assert elapsed < 1.0, elapsed
    assert "\n" not in message and "hellaswag" in message and "toy_mc" not in message
    assert "evaluate.task_include_path" in message and "reachable" in message and "evaluate.tasks" in message
    with pytest.raises(InputError, match="boolq, piqa, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa"):
        T.check_offline(["zeroshot7"], None)


def test_offline_locality_comes_from_the_task_config(monkeypatch, include):
    monkeypatch.setattr(T, "hub_reachable", lambda: False)
    T.check_offline(["toy_mc", "toy_acc"], include)  # json builder with a local file: runs offline
    for name in ("toy_hub", "toy_url", "toy_missing"):  # hub id, URL data file, missing local file
        with pytest.raises(InputError, match=f"unreachable and {name} reads"):
            T.check_offline([name], include)
    monkeypatch.setattr(T, "hub_reachable", lambda: True)
    T.check_offline(["toy_hub", "zeroshot7"], include)  # online: nothing to refuse


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def direct_decisions(model, tok, rows: list[dict]) -> tuple[float, float]:
    """acc and acc_norm computed here, unbatched: per choice the summed log-probability of its tokens
    (" " + choice after "Question: ...\\nAnswer:", split as lm-eval splits context and continuation),
    the argmax (acc) and the argmax of log-probability per character of the choice (acc_norm)."""
    hits, hits_norm = [], []
    for doc in rows:
        context = f"Question: {doc['question']}\nAnswer:"
        lls = []
        for choice in doc["choices"]:
            ctx_ids = tok(context)["input_ids"]
            whole = tok(context + " " + choice)["input_ids"]
            ids = torch.tensor([whole[:-1]])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            cont = whole[len(ctx_ids):]
            pos = range(len(whole) - 1 - len(cont), len(whole) - 1)
            lls.append(float(sum(logp[p, t] for p, t in zip(pos, cont, strict=True))))
        lengths = np.array([float(len(c)) for c in doc["choices"]])
        hits.append(int(np.argmax(lls)) == doc["label"])
        hits_norm.append(int(np.argmax(np.array(lls) / lengths)) == doc["label"])
    return float(np.mean(hits)), float(np.mean(hits_norm))


def test_local_task_in_memory_deterministic(monkeypatch, model, tok, include):
    from transformers import AutoModelForCausalLM

    def no_load(*a, **k):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_load)
    before = {n: (p.data_ptr(), p.device, p.dtype, p.clone()) for n, p in model.named_parameters()}
    vocab, pad = len(tok), tok.pad_token
    first = T.evaluate_tasks(model, tok, {"toy_mc": "acc_norm", "toy_acc": "acc"}, batch_size=4,
                             include_path=include)
    second = T.evaluate_tasks(model, tok, {"toy_mc": "acc_norm", "toy_acc": "acc"}, batch_size=4,
                              include_path=include)
    assert first == second
    for name, row in first.items():
        assert 0.0 <= row["value"] <= 1.0 and row["stderr"] > 0 and row["n"] == N_DOCS, (name, row)
    assert first["toy_mc"]["metric"] == "acc_norm" and first["toy_acc"]["metric"] == "acc"
    # the very tensors, where they were, unchanged; the caller's tokenizer untouched
    for n, p in model.named_parameters():
        ptr, device, dtype, value = before[n]
        assert (p.data_ptr(), p.device, p.dtype) == (ptr, device, dtype) and torch.equal(p, value), n
    assert (len(tok), tok.pad_token) == (vocab, pad)


@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_reported_accuracy_is_argmax_of_summed_loglikelihood(request, tok, include, which):
    net = request.getfixturevalue("model" if which == "dense" else "pruned")
    acc, acc_norm = direct_decisions(net, tok, docs())
    got = T.evaluate_tasks(net, tok, {"toy_mc": "acc", "toy_acc": "acc"}, batch_size=8, include_path=include)
    norm = T.evaluate_tasks(net, tok, {"toy_mc": "acc_norm"}, batch_size=3, include_path=include)
    assert got["toy_mc"]["value"] == pytest.approx(acc, abs=1e-12) == got["toy_acc"]["value"]
    assert norm["toy_mc"]["value"] == pytest.approx(acc_norm, abs=1e-12)
    # the standard error is lm-eval's std / sqrt(n) of the per-document hits
    assert got["toy_mc"]["stderr"] == pytest.approx(np.sqrt(acc * (1 - acc) * N_DOCS / (N_DOCS - 1) / N_DOCS))


def test_limit_caps_documents(model, tok, include):
    got = T.evaluate_tasks(model, tok, {"toy_mc": "acc"}, limit=7, include_path=include)
    assert got["toy_mc"]["n"] == 7
    for bad in (0, -1, 2.5):
        with pytest.raises(InputError, match="evaluate.task_limit"):
            T.evaluate_tasks(model, tok, {"toy_mc": "acc"}, limit=bad, include_path=include)
    with pytest.raises(InputError, match="reports \\['acc'\\], not 'acc_norm'"):
        T.evaluate_tasks(model, tok, {"toy_acc": "acc_norm"}, include_path=include)


def test_import_is_cheap():
    code = "import sys, gqaprune.evaluation.tasks; print(sorted(m for m in ('lm_eval', 'torch', 'datasets') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------
# Two gloo ranks
# ----------------------------------------------------------------------------------------------
def count_rows(net) -> list[int]:
    """Rows (sequences) every forward of ``net`` gets, appended to the returned list."""
    rows: list[int] = []
    net.register_forward_pre_hook(lambda m, args, kwargs: rows.append(int((args or [kwargs["input_ids"]])[0]
                                                                            .shape[0])), with_kwargs=True)
    return rows


def worker(out: str, include: str) -> int:
    """``python tests/test_tasks.py worker OUT INCLUDE``: 2 gloo ranks; each writes its numbers and rows."""
    from gqaprune.config.sections import DistributedParams
    from gqaprune.models.random_models import build_model
    from gqaprune.runtime.distributed import process_group
    from gqaprune.runtime.launch import launch

    code = launch(DistributedParams(nproc_per_node=2, timeout_s=300), [__file__, "worker", out, include])
    if code is not None:
        return code
    torch.set_num_threads(1)
    tokenizer = small_tokenizer()
    net = build_model("tiny-llama-gqa4", vocab_size=len(tokenizer))
    rows = count_rows(net)
    with process_group("cpu", 300) as ctx:
        got = T.evaluate_tasks(net, tokenizer, {"toy_mc": "acc_norm", "toy_acc": "acc"}, batch_size=4,
                               include_path=include, ctx=ctx)
        Path(out, f"rank{ctx.rank}.json").write_text(json.dumps({"results": got, "rows": sum(rows)}))
    return 0


@pytest.mark.slow
def test_two_gloo_ranks_give_the_one_process_numbers(tmp_path, model, tok, include):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GQAPRUNE_NO_LAUNCH"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, __file__, "worker", str(tmp_path), include], env=env, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    rows = count_rows(model)
    single = T.evaluate_tasks(model, tok, {"toy_mc": "acc_norm", "toy_acc": "acc"}, batch_size=4,
                              include_path=include)
    assert ranks[0]["results"] == ranks[1]["results"]  # every rank returns the same numbers
    for name, row in single.items():
        got = ranks[0]["results"][name]
        assert (got["metric"], got["value"], got["n"]) == (row["metric"], row["value"], row["n"]), name
        assert got["stderr"] == pytest.approx(row["stderr"], rel=1e-12), name
    # each rank ran a share of the forwards (about half, plus lm-eval's padding to equal request counts)
    assert all(0 < r["rows"] < 0.75 * sum(rows) for r in ranks), ([r["rows"] for r in ranks], sum(rows))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker(*sys.argv[2:4]))
