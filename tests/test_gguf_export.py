"""GGUF export, checked by llama.cpp itself (llama-cpp-python) against the HF model on the same token ids.

Tolerances (max |logit difference| over every position and vocabulary entry; llama.cpp runs with a
float32 KV cache, see ``load_llama``):
* f32 export: ``F32_ATOL`` = 1e-4 on tiny models (max |logit| 2-5; measured 0.5-1.5e-6),
  ``REAL_F32_ATOL`` = 5e-3 on the pruned SmolLM2 (29 layers, max |logit| ~42; measured 9.8e-4);
* f16 export: ``F16_ATOL`` = 1e-2 (measured 0.8-2.2e-3); bf16: ``BF16_ATOL`` = 5e-2 (measured 0.7-1.9e-2);
* perplexity over the same WikiText-2 windows: within 1 % (f32) of HF's.

The tiny models have their q/k weights scaled up so attention is sharp: with the N(0, 0.02) init the
softmax is nearly uniform and a wrong RoPE row order would hide under the tolerance
(``test_rope_order_matters`` proves that it does not).
Without llama-cpp-python the llama.cpp tests skip, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gqaprune.errors import UnsupportedExportError
from gqaprune.export import gguf, gguf_tensors
from gqaprune.export.gguf import export_gguf
from gqaprune.export.gguf_layers import PLACEHOLDER_FFN
from gqaprune.export.llama_cpp import (
    iter_gguf_layers,
    llama_cpp_logits,
    llama_cpp_perplexity,
    load_llama,
    quantize_gguf,
    window_nll,
)
from gqaprune.export.model_card import card_for_checkpoint, model_card, write_model_card
from gqaprune.models.loading import load_model
from gqaprune.models.random_models import build_model
from gqaprune.models.units import LayerKeep
from gqaprune.pruning.surgery import prune_model, save_pruned

sys.path.insert(0, str(Path(__file__).parent))
from helpers import SAMPLE_TEXT, small_tokenizer  # noqa: E402

F32_ATOL = 1e-4
F16_ATOL = 1e-2
BF16_ATOL = 5e-2
REAL_F32_ATOL = 5e-3
PPL_RTOL = 0.01


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36)")
    return llama_cpp


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


IDS = torch.randint(3, 300, (24,), generator=torch.Generator().manual_seed(0)).tolist()


def _sharpen(model: nn.Module, scale: float = 8.0) -> nn.Module:
    """Scale q/k weights (and biases) so attention scores are large and RoPE's row order matters."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "q_proj"):
                for lin in (attn.q_proj, attn.k_proj):
                    lin.weight.mul_(scale)
                    if lin.bias is not None:
                        lin.bias.mul_(scale)
        model.lm_head.weight.mul_(4.0)  # logits of order 1-10, so tolerances are meaningful
    return model


def _keep(model, spec: dict[int, tuple[list[int], list[int] | int]]) -> dict[int, LayerKeep]:
    """``{layer: (kv groups kept, MLP channels kept or a count of leading channels)}`` as LayerKeep."""
    out = {}
    for i, (attn, mlp) in spec.items():
        out[i] = LayerKeep(attn=list(attn), mlp=list(range(mlp)) if isinstance(mlp, int) else list(mlp))
    return out


# preset, {layer: (kv groups, mlp channels)}, expected arch
CASES = {
    "dense-llama": ("tiny-llama-gqa4", {}, "llama"),
    "dense-llama-tied": ("tiny-llama-gqa3", {}, "llama"),
    "dense-qwen2-bias-untied": ("tiny-qwen2-gqa7", {}, "qwen2"),
    "dense-mistral-mha": ("tiny-mistral-mha", {}, "llama"),
    "uniform-llama": ("tiny-llama-gqa4", {i: ([1], 48) for i in range(4)}, "llama"),
    "uniform-mistral": ("tiny-mistral-mha", {i: ([0, 2], 32) for i in range(3)}, "llama"),
    "uniform-qwen2-mlp": ("tiny-qwen2-gqa7", {i: ([0], 40) for i in range(3)}, "qwen2"),
    "nonuniform-llama": ("tiny-llama-gqa4", {0: ([0], 96), 1: ([0, 1], 40), 2: ([1], 72), 3: ([0, 1], 16)}, "deci"),
    "nonuniform-tied": ("tiny-llama-gqa3", {0: ([1], 80), 1: ([0, 1], 24), 2: ([0], 56)}, "deci"),
    "nonuniform-mistral": ("tiny-mistral-mha", {0: ([0, 1, 3], 64), 1: ([2], 24), 2: ([0, 1], 40)}, "deci"),
    "empty-attn-layer1": ("tiny-llama-gqa4", {1: ([], 96)}, "deci"),
    "empty-attn-layer0": ("tiny-llama-gqa4", {0: ([], 96), 2: ([1], 48)}, "deci"),
    "empty-mlp": ("tiny-llama-gqa4", {1: ([0, 1], 0), 3: ([0], 0)}, "deci"),
    "removed-layer": ("tiny-llama-gqa4", {1: ([], 0)}, "llama"),
    "removed-and-empty": ("tiny-llama-gqa4", {0: ([], 0), 2: ([0], 0), 3: ([], 40)}, "deci"),
    "qwen2-nonuniform-bias": ("tiny-qwen2-gqa7", {0: ([0], 24), 1: ([], 72), 2: ([0], 0)}, "deci"),
    "qwen2-removed-layer": ("tiny-qwen2-gqa7", {1: ([], 0)}, "qwen2"),
}


def _make(tmp_path: Path, tokenizer, preset: str, spec: dict, extra_bias: bool = False) -> tuple[Path, nn.Module]:
    # 20 ids more than the tokenizer has: the export pads the vocabulary (and Qwen2 adds <|endoftext|>)
    model = _sharpen(build_model(preset, vocab_size=len(tokenizer) + 20))
    replacements = {}
    if extra_bias:  # FLAP-style bias compensation: o_proj / down_proj gain a bias
        for (i, which) in ((0, "attn"), (1, "mlp")):
            layer = model.model.layers[i]
            old = layer.self_attn.o_proj if which == "attn" else layer.mlp.down_proj
            new = nn.Linear(old.in_features, old.out_features, bias=True)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.bias.copy_(torch.randn(old.out_features, generator=torch.Generator().manual_seed(i)) * 0.5)
            replacements[(i, which)] = new
    prune_model(model, _keep(model, spec), replacements)
    folder = tmp_path / "model"
    save_pruned(model, tokenizer, folder)
    return folder, load_model(folder).eval()


def _hf_logits(model: nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def _gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    _llama_cpp()
    llm = load_llama(path, n_ctx=64)
    try:
        return llama_cpp_logits(llm, ids)
    finally:
        llm.close()


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_logits_match_hf(tmp_path, tokenizer, case):
    preset, spec, arch = CASES[case]
    folder, model = _make(tmp_path, tokenizer, preset, spec)
    report = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    assert report.arch == arch
    ref = _hf_logits(model, IDS)
    got = _gguf_logits(tmp_path / "m.gguf", IDS)
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers
    diff = float(np.abs(got - ref).max())
    assert diff < F32_ATOL, f"{case}: max |logit diff| {diff:.2e} (arch {report.arch})"


def test_output_projection_biases(tmp_path, tokenizer):
    """FLAP bias compensation (o_proj / down_proj biases) goes to deci's optional attn_output / ffn_down biases."""
    folder, model = _make(tmp_path, tokenizer, "tiny-llama-gqa4", {0: ([0, 1], 64)}, extra_bias=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["gqaprune_layers"][0].get("o_proj_bias") and config["gqaprune_layers"][1].get("down_proj_bias")
    report = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    assert report.arch == "deci"
    diff = float(np.abs(_gguf_logits(tmp_path / "m.gguf", IDS) - _hf_logits(model, IDS)).max())
    assert diff < F32_ATOL


@pytest.mark.parametrize("dtype, atol, max_size", [("f16", F16_ATOL, 0.7), ("bf16", BF16_ATOL, 0.7)])
def test_half_precision_export(tmp_path, tokenizer, dtype, atol, max_size):
    preset, spec, _ = CASES["nonuniform-llama"]
    folder, model = _make(tmp_path, tokenizer, preset, spec)
    r16 = export_gguf(folder, tmp_path / "m16.gguf", dtype=dtype)
    r32 = export_gguf(folder, tmp_path / "m32.gguf", dtype="f32")
    assert r16.file_bytes < max_size * r32.file_bytes
    ref = _hf_logits(model, IDS)
    diff = float(np.abs(_gguf_logits(tmp_path / "m16.gguf", IDS) - ref).max())
    assert F32_ATOL < diff < atol  # rounded, but not more than the stated tolerance


def test_rope_order_matters(tmp_path, tokenizer, monkeypatch):
    """Negative control: without the q/k row re-ordering the logits test fails, so it can catch RoPE bugs."""
    folder, model = _make(tmp_path, tokenizer, "tiny-llama-gqa4", CASES["nonuniform-llama"][1])
    monkeypatch.setattr(gguf_tensors, "rope_pairs_order", lambda rows, n_heads: torch.as_tensor(rows))
    export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    diff = float(np.abs(_gguf_logits(tmp_path / "m.gguf", IDS) - _hf_logits(model, IDS)).max())
    assert diff > 20 * F32_ATOL


def test_emptied_mlp_needs_the_placeholder(tmp_path, tokenizer, monkeypatch):
    """Negative control: deci with feed_forward_length 0 drops that layer's attention output (llama.cpp's
    graph ``continue``s before the residual add), which the logits test catches; the placeholder fixes it."""
    folder, model = _make(tmp_path, tokenizer, "tiny-llama-gqa4", {1: ([0, 1], 0)})
    ref = _hf_logits(model, IDS)
    export_gguf(folder, tmp_path / "ok.gguf", dtype="f32")
    assert float(np.abs(_gguf_logits(tmp_path / "ok.gguf", IDS) - ref).max()) < F32_ATOL
    monkeypatch.setattr(gguf, "encode_layers", lambda specs, q_per_kv: list(specs))
    report = export_gguf(folder, tmp_path / "raw.gguf", dtype="f32")
    assert [s["ffn"] for s in report.layers] == [96, 0, 96, 96]
    assert float(np.abs(_gguf_logits(tmp_path / "raw.gguf", IDS) - ref).max()) > 100 * F32_ATOL


def test_per_layer_metadata_and_placeholders(tmp_path, tokenizer):
    folder, _ = _make(tmp_path, tokenizer, "tiny-llama-gqa4", CASES["removed-and-empty"][1])
    report = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    layers = list(iter_gguf_layers(tmp_path / "m.gguf"))
    # dense layer 0 removed; old 1 full; old 2 attention [0] + emptied MLP; old 3 emptied attention + 40 channels
    assert [(x["heads"], x["kv_heads"], x["ffn"]) for x in layers] == [
        (8, 2, 96), (4, 1, PLACEHOLDER_FFN), (0, 0, 40)]
    assert [s["source_layer"] for s in report.layers] == [1, 2, 3]
    assert len(report.placeholders) == 1 and "emptied MLP" in report.placeholders[0]


def test_export_is_deterministic_and_atomic(tmp_path, tokenizer):
    folder, _ = _make(tmp_path, tokenizer, "tiny-qwen2-gqa7", CASES["qwen2-nonuniform-bias"][1])
    out = tmp_path / "m.gguf"
    export_gguf(folder, out, dtype="bf16")
    first = out.read_bytes()
    # the destination is a hard link into a "cache": exporting again must not write through it
    cached = tmp_path / "cache_copy"
    os.link(out, cached)
    export_gguf(folder, out, dtype="bf16")
    assert out.read_bytes() == first
    assert cached.read_bytes() == first and not os.path.samefile(out, cached)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_sharded_bfloat16_checkpoint(tmp_path, tokenizer):
    """A sharded bf16 checkpoint (model.safetensors.index.json) exports to the same logits as one file."""
    folder, model = _make(tmp_path, tokenizer, "tiny-qwen2-gqa7", CASES["qwen2-nonuniform-bias"][1])
    sharded = tmp_path / "sharded"
    model.to(torch.bfloat16).save_pretrained(sharded, max_shard_size="40KB")
    tokenizer.save_pretrained(sharded)
    (sharded / "config.json").write_text((folder / "config.json").read_text())  # same geometry, same keys
    assert (sharded / "model.safetensors.index.json").is_file()
    export_gguf(sharded, tmp_path / "m.gguf", dtype="f32")
    ref = _hf_logits(load_model(sharded).eval(), IDS)  # the bf16-rounded weights, computed in float32
    assert float(np.abs(_gguf_logits(tmp_path / "m.gguf", IDS) - ref).max()) < F32_ATOL


def test_refusals(tmp_path, tokenizer):
    folder, _ = _make(tmp_path, tokenizer, "tiny-llama-gqa4", {})
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(UnsupportedExportError, match="dtype 'q4'"):
        export_gguf(folder, tmp_path / "x.gguf", dtype="q4")
    for patch, message in (({"model_type": "gemma"}, "model_type 'gemma'"),
                           ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
                            "rope type 'yarn'"),
                           ({"intermediate_size": 95}, "ffn_gate.weight|gate_proj.weight has shape")):
        (folder / "config.json").write_text(json.dumps({**config, **patch}))
        with pytest.raises(UnsupportedExportError, match=message):
            export_gguf(folder, tmp_path / "x.gguf")
    (folder / "config.json").write_text(json.dumps(config))
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True  # SentencePiece-style BPE (LLaMA-2, Mistral v0.1)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UnsupportedExportError, match="byte_fallback"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("preset", ["tiny-llama-gqa3", "tiny-qwen2-gqa7"])
def test_tokenizer_metadata_and_tokenisation(tmp_path, tokenizer, preset):
    from transformers import AutoTokenizer

    folder, _ = _make(tmp_path, tokenizer, preset, {})
    (folder / "chat_template.jinja").write_text("{% for m in messages %}<s>{{ m['content'] }}{% endfor %}")
    report = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    hf = AutoTokenizer.from_pretrained(folder)  # what users of the folder get (Qwen2 re-reads it its own way)
    from gguf import GGUFReader

    fields = GGUFReader(str(tmp_path / "m.gguf")).fields
    assert fields["tokenizer.ggml.pre"].contents() == report.tokenizer_pre
    assert fields["tokenizer.ggml.add_bos_token"].contents() == (hf("a")["input_ids"][0] == hf.bos_token_id)
    assert fields["tokenizer.ggml.tokens"].contents()[-1] == f"[PAD{len(tokenizer) + 19}]"  # padded vocabulary
    assert "messages" in fields["tokenizer.chat_template"].contents()
    _llama_cpp()
    llm = load_llama(tmp_path / "m.gguf", vocab_only=True)
    try:
        for text in (SAMPLE_TEXT[:200], " the dow jones , 2000 !", "Robert Boulter is an actor .\n\n = = x",
                     "<s> starring 1234 times"):
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text)["input_ids"], text
    finally:
        llm.close()


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 4.0},
                                  {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}])
def test_rope_scaling(tmp_path, tokenizer, rope):
    """Linear and LLaMA-3.1 RoPE scaling (the latter as a rope_freqs tensor) match HF; both change the logits."""
    spec = CASES["nonuniform-llama"][1]
    plain_folder, plain = _make(tmp_path / "plain", tokenizer, "tiny-llama-gqa4", spec)
    model = _sharpen(build_model("tiny-llama-gqa4", vocab_size=len(tokenizer) + 20,
                                 rope_parameters={"rope_theta": 10000.0, **rope}))
    prune_model(model, _keep(model, spec))
    save_pruned(model, tokenizer, tmp_path / "model")
    model = load_model(tmp_path / "model").eval()
    ref = _hf_logits(model, IDS)
    assert np.abs(ref - _hf_logits(plain, IDS)).max() > 100 * F32_ATOL  # the scaling matters at these positions
    export_gguf(tmp_path / "model", tmp_path / "m.gguf", dtype="f32")
    assert float(np.abs(_gguf_logits(tmp_path / "m.gguf", IDS) - ref).max()) < F32_ATOL


def _matrix_types(path: Path) -> dict[str, set[str]]:
    """GGML type names of the 2-D tensors of a GGUF file, by tensor kind (``ffn_down``, ``attn_q``...)."""
    from gguf import GGUFReader

    out: dict[str, set[str]] = {}
    for t in GGUFReader(str(path)).tensors:
        if len(t.shape) == 2:
            out.setdefault(t.name.split(".")[-2], set()).add(t.tensor_type.name)
    return out


def test_ffn_padding_is_exact(tmp_path, tokenizer):
    """Zero MLP channels up to a multiple of 32 leave the logits unchanged and appear in the metadata."""
    folder, model = _make(tmp_path, tokenizer, "tiny-qwen2-gqa7", CASES["qwen2-nonuniform-bias"][1])
    report = export_gguf(folder, tmp_path / "m.gguf", dtype="f32", ffn_multiple=32)
    assert [x["ffn"] for x in iter_gguf_layers(tmp_path / "m.gguf")] == [32, 96, 32]  # 24, 72, emptied
    assert [s["ffn_pad"] for s in report.layers] == [8, 24, 0]
    diff = float(np.abs(_gguf_logits(tmp_path / "m.gguf", IDS) - _hf_logits(model, IDS)).max())
    assert diff < F32_ATOL


def test_quantize(tmp_path, tokenizer):
    _llama_cpp()
    folder, model = _make(tmp_path, tokenizer, "tiny-llama-gqa4", CASES["nonuniform-llama"][1])
    export_gguf(folder, tmp_path / "m.gguf", dtype="f16")
    export_gguf(folder, tmp_path / "m32.gguf", dtype="f16", ffn_multiple=32)
    ref = _hf_logits(model, IDS)
    for qtype, atol in (("Q8_0", 0.1), ("Q4_0", 1.0)):
        out = quantize_gguf(tmp_path / "m32.gguf", tmp_path / f"m-{qtype}.gguf", qtype, nthread=2)
        assert out.stat().st_size < (tmp_path / "m32.gguf").stat().st_size
        types = _matrix_types(out)  # llama.cpp keeps the output matrix at higher precision by design
        assert types["ffn_down"] == {qtype} and not any("F16" in v for v in types.values()), types
        diff = float(np.abs(_gguf_logits(out, IDS) - ref).max())
        assert diff < atol, f"{qtype}: {diff:.3f}"
    # MLP widths 40 / 72 / 16 are not multiples of 32: without padding llama.cpp keeps those ffn_down in F16
    unpadded = quantize_gguf(tmp_path / "m.gguf", tmp_path / "u-Q8_0.gguf", "Q8_0", nthread=2)
    assert _matrix_types(unpadded)["ffn_down"] == {"Q8_0", "F16"}
    with pytest.raises(UnsupportedExportError, match="Q3_X"):
        quantize_gguf(tmp_path / "m.gguf", tmp_path / "bad.gguf", "Q3_X")


def test_model_card_is_deterministic(tmp_path, tokenizer):
    folder, _ = _make(tmp_path, tokenizer, "tiny-llama-gqa4", CASES["empty-mlp"][1])
    config = json.loads((folder / "config.json").read_text())
    config["gqaprune_info"] = {"plan": {"ratio": 0.2, "strategy": "hgsp", "importance": "taylor", "temperature": 0.0},
                               "surgery": {"compensation": "lstsq"}, "params_before": 1000, "params_after": 800,
                               "removed_layers": []}
    (folder / "config.json").write_text(json.dumps(config))
    metrics = {"seq_len": 128, "ppl": {"dense": {"wikitext2": 55.04}, "pruned": {"wikitext2": 90.2}},
               "tokens_evaluated": {"wikitext2": 4096}}
    text = card_for_checkpoint(folder, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", metrics=metrics)
    assert text == card_for_checkpoint(folder, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", metrics=metrics)
    front = text.split("---\n")[1]
    assert 'base_model: "HuggingFaceTB/SmolLM2-135M-Instruct"' in front
    assert "  ratio: 0.2\n" in front and '  strategy: "hgsp"' in front and '"wikitext2": 90.2' in front
    assert "| wikitext2 | 90.20 | 55.04 | 1.639x | 4096 |" in text
    yaml = pytest.importorskip("yaml")
    meta = yaml.safe_load(front)  # the hub parses the front matter as YAML
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "pruned" in meta["tags"]
    assert meta["gqaprune"]["perplexity"] == {"wikitext2": 90.2} and meta["gqaprune"]["compensation"] == "lstsq"
    path = write_model_card(folder, text)
    assert path.read_text() == text
    with pytest.raises(ValueError, match="kind"):
        model_card(name="x", base_model="y", kind="dense")


# ------------------------------------------------------------------------------------------------
# the real model
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_pruned(tmp_path_factory):
    """SmolLM2-135M pruned by hand to a non-uniform shape with an emptied attention, an emptied MLP and a
    removed layer (no compensation: the export, not the plan, is under test)."""
    from gqaprune.models.sources import convert_embedded

    root = tmp_path_factory.mktemp("smollm2")
    dense = convert_embedded(root / "dense")
    model = load_model(dense).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dense)
    keep = {}
    for i in range(30):
        kv = [[0, 1, 2], [0, 2], [1]][i % 3]
        keep[i] = LayerKeep(attn=kv, mlp=list(range(1536 - 64 * (i % 5))))
    keep[4] = LayerKeep(attn=[], mlp=list(range(1024)))      # emptied attention
    keep[9] = LayerKeep(attn=[0, 1, 2], mlp=[])               # emptied MLP
    keep[20] = LayerKeep(attn=[], mlp=[])                     # removed layer
    prune_model(model, keep)
    save_pruned(model, tok, root / "pruned")
    return root / "pruned", model, tok


@pytest.mark.slow
def test_smollm2_tokenizer_matches_hf(tmp_path, smollm2_pruned):
    folder, _, tok = smollm2_pruned
    report = export_gguf(folder, tmp_path / "m.gguf", dtype="f16")
    assert report.arch == "deci"
    _llama_cpp()
    llm = load_llama(tmp_path / "m.gguf", vocab_only=True)
    texts = [" = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor .",
             "The year 2024 had 366 days; 12345 + 678 = 13023.", "  leading spaces,\ttabs\nand new\n\nlines",
             "Ünïcödé — “quotes” and emoji 🙂, naïve café.",
             tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                     add_generation_prompt=True)]
    try:
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
    finally:
        llm.close()


@pytest.mark.slow
def test_smollm2_logits_and_perplexity(tmp_path, smollm2_pruned, data_dir):
    from gqaprune.data.windows import corpus_token_ids

    folder, model, tok = smollm2_pruned
    report = export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    assert report.arch == "deci" and report.n_layers == 29 and len(report.placeholders) == 1
    ids = corpus_token_ids(tok, "wikitext2", "test", data_dir=data_dir)
    windows = ids[: 4 * 128].view(4, 128)
    hf_nll, hf_logits = 0.0, []
    with torch.no_grad():
        for w in windows:
            lg = model(input_ids=w[None]).logits[0].float()
            hf_logits.append(lg.numpy())
            hf_nll += window_nll(lg, w)
    hf_ppl = float(np.exp(hf_nll / (4 * 127)))
    _llama_cpp()
    llm = load_llama(tmp_path / "m.gguf", n_ctx=128)
    try:
        got = llama_cpp_logits(llm, windows[0])
    finally:
        llm.close()
    diff = float(np.abs(got - hf_logits[0]).max())
    assert diff < REAL_F32_ATOL, f"max |logit diff| {diff:.2e}"
    cpp_ppl = llama_cpp_perplexity(tmp_path / "m.gguf", windows)
    assert abs(cpp_ppl / hf_ppl - 1) < PPL_RTOL, (cpp_ppl, hf_ppl)
