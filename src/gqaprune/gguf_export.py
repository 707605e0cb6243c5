"""Export a (pruned) checkpoint folder to GGUF for llama.cpp, and quantise it with llama.cpp's own quantiser.

Input: a normal HF folder (``config.json``, ``model.safetensors`` or a sharded index, tokenizer files),
dense or pruned by :mod:`gqaprune.surgery`, optionally with ``config.gqaprune_layers`` (per-layer KV heads
and MLP widths; see ``hf_code/modeling_gqaprune.py``).

Which llama.cpp architecture, and why (read in the llama.cpp that ``llama-cpp-python==0.3.36`` bundles):

* every layer the same shape -> ``llama`` (LLaMA, Mistral) or ``qwen2`` (Qwen2 / Qwen2.5);
* otherwise -> ``deci``: its GGUF keys ``head_count``, ``head_count_kv`` and ``feed_forward_length`` are
  per-layer arrays, q/k/v/o and MLP biases are optional tensors, and a layer with ``head_count == 0``
  skips attention (the residual passes through). Two corners of that graph need an encoding:

  - a layer with ``feed_forward_length == 0`` ``continue``s *before* the residual add, which drops
    the layer's attention output. A kept attention with an emptied MLP is therefore written with a
    placeholder MLP of :data:`PLACEHOLDER_FFN` channels whose weights are all zero (its output is
    exactly 0, also after quantisation);
  - llama.cpp derives head_dim and the RoPE width from layer 0's head count (``n_head()`` defaults
    to layer 0) and sets them to 0 when layer 0 has no heads. An emptied attention in layer 0 is
    therefore written as one zero-weight KV group (q, k, v, o all 0: the block adds exactly 0).

  ``deci`` uses llama.cpp's "normal" RoPE (rotates adjacent pairs), like ``llama``. HF's LLaMA, Mistral
  and Qwen2 rotate the two halves of each head (``rotate_half``), so q/k rows (and q/k biases) are
  re-ordered inside each head: row ``2i`` <- ``i``, row ``2i+1`` <- ``i + head_dim/2``. The
  ``qwen2`` architecture rotates halves itself and gets the rows unchanged.

Tensors are streamed: metadata and tensor infos are written first from the safetensors headers, then
one tensor at a time is read (``safe_open``), converted and appended, so peak memory is about one
tensor. The file is written next to the destination under a temporary name and renamed into place
(never written through an existing file, which may be a hard link into a DVC cache). Equal inputs give
byte-identical files (no timestamps, fixed order).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapters import Geometry as AdapterGeometry
from .adapters import get_adapter
from .artifacts import atomic_path
from .errors import GqapruneError
from .schema import GGUF_DTYPES, GGUF_QUANT_TYPES

log = logging.getLogger(__name__)

#: MLP width (channels) of the zero placeholder written for an emptied MLP whose layer keeps attention.
#: 32 is the block size of Q8_0 / Q4_0, so the placeholder quantises without a fallback type.
PLACEHOLDER_FFN = 32

DTYPES = GGUF_DTYPES
QUANT_TYPES = GGUF_QUANT_TYPES

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE = ("default", "linear", "llama3")


class UnsupportedExportError(GqapruneError, ValueError):
    """The checkpoint (or its tokenizer) uses something the GGUF export cannot express; the message says what."""


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """The shape of one kept decoder layer as written to GGUF (counts, not bytes).

    ``kv_heads`` / ``heads`` / ``ffn`` are what llama.cpp is told; ``attn_placeholder`` /
    ``ffn_placeholder`` mark zero-weight blocks that encode an emptied block (module docstring).
    """

    index: int                # layer index in the checkpoint (= GGUF block index)
    source_layer: int         # layer index in the dense model
    kv_heads: int
    heads: int
    ffn: int
    attn_placeholder: bool = False
    ffn_placeholder: bool = False
    ffn_pad: int = 0          # zero channels appended to the MLP (``ffn`` includes them)


@dataclass(frozen=True)
class Geometry(AdapterGeometry):
    """The family adapter's geometry (:class:`gqaprune.adapters.Geometry`) plus what the GGUF header
    needs: context length, RMS-norm epsilon and RoPE settings (``rope`` as in the HF config)."""

    n_ctx: int = 4096
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope: dict = field(default_factory=dict, hash=False)

    # the exporter's short names for the adapter's fields
    hidden = property(lambda self: self.hidden_size)
    heads = property(lambda self: self.num_heads)
    kv_heads = property(lambda self: self.num_kv_heads)
    intermediate = property(lambda self: self.intermediate_size)
    vocab = property(lambda self: self.vocab_size)
    tied = property(lambda self: self.tied_embeddings)


@dataclass
class ExportReport:
    """What :func:`export_gguf` wrote (sizes in bytes)."""

    path: str
    arch: str
    dtype: str
    n_layers: int
    n_tensors: int
    file_bytes: int
    tokenizer_pre: str
    layers: list[dict] = field(default_factory=list)
    placeholders: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-dict form, for a metrics / report JSON."""
        return asdict(self)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UnsupportedExportError(f"{path} not found: the export needs an HF model folder "
                                     "(config.json, model.safetensors, tokenizer files)") from None


def read_geometry(config: dict, config_path: str = "config.json") -> Geometry:
    """Dense geometry from a config dict (through the family's adapter); refuses families, RoPE types
    and sliding windows llama.cpp's graphs lack."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedExportError(f"{config_path}: model_type {model_type!r} cannot be exported to GGUF; "
                                     f"supported families: {', '.join(SUPPORTED_FAMILIES)}")
    hf_config = AutoConfig.for_model(**config)
    base = get_adapter(hf_config).geometry(hf_config)
    # transformers 5 keeps RoPE settings in rope_parameters; older configs use rope_theta + rope_scaling
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE:
        raise UnsupportedExportError(f"{config_path}: rope type {rope_type!r} is not exported; supported: "
                                     f"{', '.join(SUPPORTED_ROPE)}")
    rope["rope_type"] = rope_type
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise UnsupportedExportError(f"{config_path}: use_sliding_window=true is not supported by llama.cpp's "
                                     "qwen2/deci graphs; export a model trained without it")
    return Geometry(**dataclasses.asdict(base), n_ctx=int(config.get("max_position_embeddings") or 4096),
                    rms_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope=rope)


def layer_specs(config: dict, geo: Geometry) -> list[LayerSpec]:
    """Per-layer shapes of the checkpoint, before any placeholder is chosen."""
    specs = config.get("gqaprune_layers")
    if not specs:
        return [LayerSpec(i, i, geo.kv_heads, geo.heads, geo.intermediate)
                for i in range(int(config["num_hidden_layers"]))]
    if len(specs) != int(config["num_hidden_layers"]):
        raise UnsupportedExportError(f"config.json: gqaprune_layers has {len(specs)} entries for "
                                     f"num_hidden_layers={config['num_hidden_layers']}; re-save the checkpoint")
    out = []
    for i, s in enumerate(specs):
        kv, ffn = int(s["num_key_value_heads"]), int(s["intermediate_size"])
        out.append(LayerSpec(i, int(s.get("source_layer", i)), kv, kv * geo.q_per_kv, ffn))
    return out


def encode_layers(specs: list[LayerSpec], q_per_kv: int) -> list[LayerSpec]:
    """Apply the placeholder encodings (module docstring) that the ``deci`` graph needs.

    ``q_per_kv``: query heads per KV head of the dense model (the placeholder attention keeps that ratio).
    A layer with neither attention nor MLP would contribute nothing and is refused (surgery removes
    such layers; a folder holding one was not written by it).
    """
    out = []
    for s in specs:
        if s.kv_heads == 0 and s.ffn == 0:
            raise UnsupportedExportError(f"config.json: gqaprune_layers[{s.index}] has neither attention nor MLP; "
                                         "remove the layer (surgery does) before exporting")
        if s.kv_heads == 0 and s.index == 0:
            s = LayerSpec(s.index, s.source_layer, 1, q_per_kv, s.ffn, attn_placeholder=True)
        if s.ffn == 0:
            s = LayerSpec(s.index, s.source_layer, s.kv_heads, s.heads, PLACEHOLDER_FFN,
                          attn_placeholder=s.attn_placeholder, ffn_placeholder=True)
        out.append(s)
    return out


def pad_ffn(spec: LayerSpec, multiple: int) -> LayerSpec:
    """``spec`` with its MLP width rounded up to a multiple of ``multiple`` by zero channels (``ffn_pad``)."""
    width = -(-spec.ffn // multiple) * multiple
    if width == spec.ffn:
        return spec
    return dataclasses.replace(spec, ffn=width, ffn_pad=0 if spec.ffn_placeholder else width - spec.ffn)


# ------------------------------------------------------------------------------------------------
# tensors
# ------------------------------------------------------------------------------------------------
class _Checkpoint:
    """Name -> (file, shape, dtype) of the safetensors tensors, read from the headers only."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(_read_json(index)["weight_map"].values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise UnsupportedExportError(f"{model_dir}: no model.safetensors or model.safetensors.index.json; "
                                         "save the model with safetensors (save_pretrained does by default)")
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            with safe_open(model_dir / f, framework="pt") as st:
                for name in st.keys():
                    self.where[name] = model_dir / f
                    self.shapes[name] = tuple(st.get_slice(name).get_shape())
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file on demand (the files stay open, memory-mapped)."""
        from safetensors import safe_open

        path = self.where[name]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._open[path].get_tensor(name)

    def close(self) -> None:
        """Close the open safetensors files."""
        self._stack.close()


@dataclass
class _Tensor:
    """One GGUF tensor to write: its name, numpy shape (rows, cols), GGML type and how to produce it."""

    name: str
    shape: tuple[int, ...]
    qtype: int                       # gguf.GGMLQuantizationType
    make: Callable[[], torch.Tensor]  # returns float32 data of ``shape``


def rope_pairs_order(rows: torch.Tensor | np.ndarray, n_heads: int) -> torch.Tensor:
    """Re-order q/k rows (or a bias) per head from HF's half-split RoPE layout to llama.cpp's pair layout.

    ``rows``: (n_heads * head_dim, ...) -> same shape; inside each head, output row 2i is input row i and
    output row 2i+1 is input row i + head_dim/2.
    """
    t = torch.as_tensor(rows)
    d = t.shape[0] // n_heads
    rest = t.shape[1:]
    return t.reshape(n_heads, 2, d // 2, *rest).transpose(1, 2).reshape(t.shape)


def _hf(prefix: str, i: int, leaf: str) -> str:
    return f"model.layers.{i}.{prefix}.{leaf}"


def _plan_tensors(ckpt: _Checkpoint, geo: Geometry, layers: list[LayerSpec], arch: str, dtype: str,
                  ) -> list[_Tensor]:
    """Every tensor of the GGUF file in write order, checked against the checkpoint before anything is written."""
    from gguf import GGMLQuantizationType as Q

    wtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[dtype]
    used: set[str] = set()
    out: list[_Tensor] = []
    permute = arch in ("llama", "deci")  # normal (pair) RoPE in llama.cpp
    d, h = geo.head_dim, geo.hidden

    def need(name: str, shape: tuple[int, ...]) -> str:
        if name not in ckpt.shapes:
            raise UnsupportedExportError(f"model.safetensors: tensor {name} is missing (expected shape {shape}); "
                                         "the checkpoint does not match its config.json")
        if ckpt.shapes[name] != shape:
            raise UnsupportedExportError(f"model.safetensors: tensor {name} has shape {ckpt.shapes[name]}, the "
                                         f"config says {shape}; the checkpoint does not match its config.json")
        used.add(name)
        return name

    def src(gguf_name: str, hf_name: str, shape: tuple[int, ...], heads_for_rope: int = 0,
            pad_rows: int = 0, pad_cols: int = 0) -> None:
        """``hf_name`` of checkpoint ``shape``, q/k rows re-ordered for RoPE, zero rows/columns appended."""
        need(hf_name, shape)
        qtype = wtype if len(shape) == 2 else Q.F32  # norms and biases stay float32, as llama.cpp expects
        gshape = (shape[0] + pad_rows, *((shape[1] + pad_cols,) if len(shape) == 2 else ()))

        def make(hf_name=hf_name, heads_for_rope=heads_for_rope, pad_rows=pad_rows, pad_cols=pad_cols):
            t = ckpt.get(hf_name).float()
            t = rope_pairs_order(t, heads_for_rope) if heads_for_rope else t
            if pad_rows or pad_cols:
                # F.pad takes (last dim left, right, first dim left, right)
                t = torch.nn.functional.pad(t, (0, pad_cols, 0, pad_rows) if t.dim() == 2 else (0, pad_rows))
            return t

        out.append(_Tensor(gguf_name, gshape, qtype, make))

    def zeros(gguf_name: str, shape: tuple[int, ...]) -> None:
        out.append(_Tensor(gguf_name, shape, wtype if len(shape) == 2 else Q.F32,
                           lambda shape=shape: torch.zeros(shape)))

    src("token_embd.weight", "model.embed_tokens.weight", (geo.vocab, h))
    for s in layers:
        i, b = s.index, f"blk.{s.index}"
        attn_bias = {}
        if s.attn_placeholder:
            heads = geo.q_per_kv
            src(f"{b}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", (h,))
            zeros(f"{b}.attn_q.weight", (heads * d, h))
            zeros(f"{b}.attn_k.weight", (d, h))
            zeros(f"{b}.attn_v.weight", (d, h))
            zeros(f"{b}.attn_output.weight", (h, heads * d))
        elif s.kv_heads:
            q_out, kv_out = s.heads * d, s.kv_heads * d
            src(f"{b}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", (h,))
            src(f"{b}.attn_q.weight", _hf("self_attn.q_proj", i, "weight"), (q_out, h), s.heads if permute else 0)
            src(f"{b}.attn_k.weight", _hf("self_attn.k_proj", i, "weight"), (kv_out, h),
                s.kv_heads if permute else 0)
            src(f"{b}.attn_v.weight", _hf("self_attn.v_proj", i, "weight"), (kv_out, h))
            for proj, gname, n, heads in (("q_proj", "attn_q", q_out, s.heads),
                                          ("k_proj", "attn_k", kv_out, s.kv_heads),
                                          ("v_proj", "attn_v", kv_out, 0)):
                bias = _hf(f"self_attn.{proj}", i, "bias")
                if bias in ckpt.shapes:
                    attn_bias[proj] = True
                    src(f"{b}.{gname}.bias", bias, (n,), heads if permute else 0)
            src(f"{b}.attn_output.weight", _hf("self_attn.o_proj", i, "weight"), (h, q_out))
            if _hf("self_attn.o_proj", i, "bias") in ckpt.shapes:
                src(f"{b}.attn_output.bias", _hf("self_attn.o_proj", i, "bias"), (h,))
        if s.ffn_placeholder:
            src(f"{b}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight", (h,))
            zeros(f"{b}.ffn_gate.weight", (s.ffn, h))
            zeros(f"{b}.ffn_up.weight", (s.ffn, h))
            zeros(f"{b}.ffn_down.weight", (h, s.ffn))
        elif s.ffn == 0:  # only reachable without encode_layers (the negative-control test)
            used.add(f"model.layers.{i}.post_attention_layernorm.weight")
        else:
            src(f"{b}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight", (h,))
            # ffn_pad zero channels: gate/up rows and down columns of zeros contribute exactly 0
            w, pad = s.ffn - s.ffn_pad, s.ffn_pad
            src(f"{b}.ffn_gate.weight", _hf("mlp.gate_proj", i, "weight"), (w, h), pad_rows=pad)
            src(f"{b}.ffn_up.weight", _hf("mlp.up_proj", i, "weight"), (w, h), pad_rows=pad)
            src(f"{b}.ffn_down.weight", _hf("mlp.down_proj", i, "weight"), (h, w), pad_cols=pad)
            for proj, gname, n, p in (("gate_proj", "ffn_gate", w, pad), ("up_proj", "ffn_up", w, pad),
                                      ("down_proj", "ffn_down", h, 0)):
                if _hf(f"mlp.{proj}", i, "bias") in ckpt.shapes:
                    src(f"{b}.{gname}.bias", _hf(f"mlp.{proj}", i, "bias"), (n,), pad_rows=p)
    if geo.rope["rope_type"] == "llama3":
        freqs = _llama3_rope_factors(geo)
        out.append(_Tensor("rope_freqs.weight", tuple(freqs.shape), Q.F32, lambda f=freqs: f))
    src("output_norm.weight", "model.norm.weight", (h,))
    if not geo.tied:
        src("output.weight", "lm_head.weight", (geo.vocab, h))
    elif "lm_head.weight" in ckpt.shapes:
        used.add("lm_head.weight")  # a tied head saved anyway: the same matrix as the embeddings
    # the surgery keeps the norm of an emptied block in the module tree; llama.cpp has no slot for it
    for s in layers:
        if s.kv_heads == 0:
            used.add(f"model.layers.{s.index}.input_layernorm.weight")
        used.add(f"model.layers.{s.index}.self_attn.rotary_emb.inv_freq")
    left = sorted(set(ckpt.shapes) - used)
    if left:
        raise UnsupportedExportError(f"model.safetensors: tensors with no GGUF counterpart: {', '.join(left[:6])}"
                                     f"{' ...' if len(left) > 6 else ''}; the export handles LLaMA/Qwen2/Mistral "
                                     "decoders with optional q/k/v/o and MLP biases only")
    return out


def _llama3_rope_factors(geo: Geometry) -> torch.Tensor:
    """Per-frequency RoPE divisors of LLaMA-3.1's "llama3" scaling, shape (head_dim/2,), as llama.cpp reads them.

    Frequencies whose wavelength exceeds ``original_max_position_embeddings / low_freq_factor`` are
    divided by ``factor``, short wavelengths are kept, and the band between is interpolated smoothly.
    """
    r = geo.rope
    d = geo.head_dim
    inv_freq = 1.0 / (geo.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    factor = float(r.get("factor", 8.0))
    low, high = float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old_ctx = float(r.get("original_max_position_embeddings", 8192))
    wavelen = 2 * torch.pi / inv_freq
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0, 1)
    # divisor 1 for short wavelengths (smooth=1), factor for long ones (smooth=0)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    return divisor.float()


# ------------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------------
# Pre-tokenizer regexes as they appear in tokenizer.json files, mapped to the name llama.cpp knows them by.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def detect_pre_tokenizer(pre: dict | None) -> tuple[str, str | None]:
    """The llama.cpp pre-tokenizer name for a tokenizer.json ``pre_tokenizer`` -> (name, warning or None).

    Recognised: GPT-2 byte-level (``gpt-2``), digits split one by one + byte-level (``smollm``, SmolLM's
    original tokenizer), LLaMA-3's split regex (``llama-bpe``), Qwen2's (``qwen2``). Anything else gets
    ``gpt-2`` when it is byte-level, with a warning, since that is the closest general splitter.
    """
    if pre is None:
        return "gpt-2", "tokenizer.json has no pre_tokenizer; assuming GPT-2 byte-level splitting"
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", None
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm", None
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe", None
        if pattern == _QWEN2_SPLIT:
            return "qwen2", None
    if "ByteLevel" in kinds:
        return "gpt-2", (f"pre-tokenizer {kinds} is not one llama.cpp names; wrote 'gpt-2' (GPT-2 byte-level "
                         "splitting): tokenisation may differ from HF on some texts")
    raise UnsupportedExportError(f"tokenizer.json: pre_tokenizer {kinds} is not byte-level BPE; only byte-level BPE "
                                 "tokenizers (LLaMA-3, Qwen2, SmolLM, GPT-2 style) are exported")


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    warnings: list[str]


def read_tokenizer(model_dir: Path, n_vocab: int) -> _Vocab:
    """The HF tokenizer of ``model_dir`` as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary.

    Token types: special added tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL; ids the
    tokenizer lacks up to the model's vocab size are UNUSED ``[PAD<id>]``. Whether BOS/EOS are added is
    read from what the HF tokenizer itself does on a sample text (that includes tokenizer_config flags).
    """
    from gguf import TokenType
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise UnsupportedExportError(f"{model_dir}: the tokenizer has no tokenizer.json (fast tokenizer); "
                                     "only byte-level BPE tokenizers with a tokenizer.json are exported")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = f"{model.get('type')} model" + (" with byte_fallback (SentencePiece style)"
                                               if model.get("byte_fallback") else "")
        raise UnsupportedExportError(f"{model_dir}/tokenizer.json: {kind} is not exported; only byte-level BPE "
                                     "tokenizers (LLaMA-3, Qwen2, SmolLM, GPT-2 style) are")
    pre, warn = detect_pre_tokenizer(spec.get("pre_tokenizer"))
    warnings = [warn] if warn else []
    norm = (spec.get("normalizer") or {}).get("type")
    if norm in ("NFC", "NFKC"):
        # Qwen2's tokenizer sets NFC; llama.cpp applies no normaliser, which only matters for text not in NFC
        warnings.append(f"tokenizer normalizer {norm} is not applied by llama.cpp: text not already in {norm} "
                        "may tokenise differently")
    elif norm is not None:
        raise UnsupportedExportError(f"{model_dir}/tokenizer.json: normalizer {norm} is set; llama.cpp's byte-level "
                                     "BPE applies none (only NFC/NFKC are accepted, with a warning)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(a["id"]): a for a in spec.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = int(a["id"])
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise UnsupportedExportError(f"{model_dir}: the tokenizer has {size} ids but the model's vocab_size is "
                                     f"{n_vocab}; resize the embeddings (model.resize_token_embeddings) first")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:
            types[i] = int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            types[i] = int(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    full = tok("a b", add_special_tokens=True)["input_ids"]
    add_bos = tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id
    add_eos = tok.eos_token_id is not None and len(full) > len(plain) and full[-1] == tok.eos_token_id
    template = getattr(tok, "chat_template", None)
    return _Vocab(tokens, types, merges, pre, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id,
                  tok.pad_token_id, add_bos, add_eos, template if isinstance(template, str) else None, warnings)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
def choose_arch(geo: Geometry, layers: list[LayerSpec], extra_bias: bool) -> str:
    """``llama`` / ``qwen2`` when one shape fits every layer, else ``deci`` (per-layer shapes).

    llama.cpp's ``qwen2`` sizes q and o as hidden x hidden and has no o / MLP biases, so a Qwen2 model
    whose heads x head_dim differ from hidden_size, or that gained such biases, goes to ``deci`` too.
    """
    shapes = {(s.kv_heads, s.ffn) for s in layers}
    uniform = len(shapes) == 1 and all(s.kv_heads > 0 and s.ffn > 0 for s in layers)
    if not uniform:
        return "deci"
    if geo.model_type == "qwen2":
        heads = layers[0].heads
        fits = heads * geo.head_dim == geo.hidden and not extra_bias and geo.rope["rope_type"] != "llama3"
        return "qwen2" if fits else "deci"  # qwen2 has no rope_freqs tensor either
    return "llama"


def _to_numpy(t: torch.Tensor, qtype: int) -> np.ndarray:
    """float32 data -> the bytes of GGML type ``qtype`` (F32, F16 or BF16) as a numpy array of the same shape."""
    from gguf import GGMLQuantizationType as Q

    t = t.contiguous()
    if qtype == Q.F32:
        return t.float().numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    # numpy has no bfloat16: write its 16-bit patterns (round-to-nearest-even by torch)
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def export_gguf(model_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f16",
                name: str | None = None, ffn_multiple: int = 1) -> ExportReport:
    """Write the checkpoint in ``model_dir`` as one GGUF file ``out_path`` with its tokenizer and chat template.

    ``dtype``: storage type of the 2-D weights ("f32", "f16", "bf16"); norms and biases are always f32.
    ``name``: ``general.name`` (default: the folder name).
    ``ffn_multiple``: pad every MLP width up to a multiple of this with zero channels (outputs unchanged).
    llama.cpp quantises a matrix only when its row length is a multiple of the type's block (32 for
    Q8_0 / Q4_0 / Q5_0, 256 for K-quants); ``ffn_down``'s rows are the MLP width, and a pruned width that
    is a multiple of 8 only falls back to F16. Export the file to be quantised with 32.
    Raises :class:`UnsupportedExportError` naming the key or file when the checkpoint uses something
    llama.cpp cannot run; nothing is written then.
    """
    gguf = _gguf_module()
    if dtype not in DTYPES:
        raise UnsupportedExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if ffn_multiple < 1:
        raise UnsupportedExportError(f"ffn_multiple must be >= 1, got {ffn_multiple}")
    model_dir, out = Path(model_dir), Path(out_path)
    config = _read_json(model_dir / "config.json")
    geo = read_geometry(config, str(model_dir / "config.json"))
    raw = layer_specs(config, geo)
    ckpt = _Checkpoint(model_dir)
    extra_bias = any(n.endswith(("o_proj.bias", "down_proj.bias", "gate_proj.bias", "up_proj.bias"))
                     for n in ckpt.shapes)
    arch = choose_arch(geo, raw, extra_bias)
    layers = encode_layers(raw, geo.q_per_kv) if arch == "deci" else raw
    layers = [pad_ffn(s, ffn_multiple) for s in layers]
    warnings: list[str] = []
    sliding = config.get("sliding_window")
    if geo.model_type == "mistral" and sliding and int(sliding) < geo.n_ctx:
        warnings.append(f"sliding_window={sliding}: llama.cpp attends to the whole context, so outputs agree "
                        f"with HF for sequences up to {sliding} tokens only")
    tensors = _plan_tensors(ckpt, geo, layers, arch, dtype)
    vocab = read_tokenizer(model_dir, geo.vocab)
    warnings += vocab.warnings

    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name or model_dir.resolve().name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    writer.add_context_length(geo.n_ctx)
    writer.add_embedding_length(geo.hidden)
    writer.add_block_count(len(layers))
    if arch == "deci":
        writer.add_feed_forward_length([s.ffn for s in layers])
        writer.add_head_count([s.heads for s in layers])
        writer.add_head_count_kv([s.kv_heads for s in layers])
    else:
        writer.add_feed_forward_length(layers[0].ffn)
        writer.add_head_count(layers[0].heads)
        writer.add_head_count_kv(layers[0].kv_heads)
    writer.add_key_length(geo.head_dim)
    writer.add_value_length(geo.head_dim)
    writer.add_rope_dimension_count(geo.head_dim)
    writer.add_rope_freq_base(geo.rope_theta)
    if geo.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(geo.rope["factor"]))
    writer.add_layer_norm_rms_eps(geo.rms_eps)
    writer.add_vocab_size(geo.vocab)
    # provenance, ignored by llama.cpp: which dense layer each block came from
    writer.add_array("gqaprune.source_layers", [s.source_layer for s in layers])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for add, value in ((writer.add_bos_token_id, vocab.bos), (writer.add_eos_token_id, vocab.eos),
                       (writer.add_unk_token_id, vocab.unk), (writer.add_pad_token_id, vocab.pad)):
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)

    for t in tensors:
        nbytes = int(np.prod(t.shape)) * (4 if t.qtype == gguf.GGMLQuantizationType.F32 else 2)
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32 if t.qtype == gguf.GGMLQuantizationType.F32
                                                         else np.float16), nbytes, raw_dtype=t.qtype)
    try:
        with atomic_path(out) as tmp:  # a new inode: never writes through a hard link at ``out``
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                data = t.make()
                if dtype == "f16" and t.qtype == gguf.GGMLQuantizationType.F16 and data.abs().max() > 65504:
                    raise UnsupportedExportError(f"tensor {t.name} has values beyond float16's range (65504); "
                                                 "export with --dtype bf16 or f32")
                writer.write_tensor_data(_to_numpy(data, t.qtype))
                del data
            writer.close()
    finally:
        writer.close()
        ckpt.close()
    placeholders = [f"layer {s.index}: zero attention (1 KV group) for an emptied attention in layer 0"
                    for s in layers if s.attn_placeholder]
    placeholders += [f"layer {s.index}: zero MLP ({s.ffn} channels) for an emptied MLP"
                     for s in layers if s.ffn_placeholder]
    return ExportReport(path=str(out), arch=arch, dtype=dtype, n_layers=len(layers), n_tensors=len(tensors),
                        file_bytes=out.stat().st_size, tokenizer_pre=vocab.pre,
                        layers=[asdict(s) for s in layers], placeholders=placeholders, warnings=warnings)


# ------------------------------------------------------------------------------------------------
# quantisation (llama.cpp's own quantiser, through llama-cpp-python)
# ------------------------------------------------------------------------------------------------
def _gguf_module():
    """The ``gguf`` package (GGUF writer), or an error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UnsupportedExportError("the GGUF export needs the gguf package: pip install gguf==0.19.0 "
                                     "(scripts/install.sh installs it)") from None
    return gguf


def llama_cpp_module():
    """``llama_cpp`` (llama-cpp-python), or an ImportError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("llama-cpp-python is needed for quantisation and the llama.cpp checks: "
                          "pip install llama-cpp-python==0.3.36 (compiles llama.cpp, ~7 min on 2 cores)") from e
    return llama_cpp


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, qtype: str = "Q8_0", nthread: int = 0) -> Path:
    """Quantise the GGUF ``src`` into ``dst`` with llama.cpp's quantiser (``llama_model_quantize``).

    ``qtype``: one of :data:`QUANT_TYPES` (e.g. "Q8_0", "Q4_K_M", "Q4_0"); tensors whose row length does
    not fit the type's block are given a compatible type by llama.cpp (it logs a fallback). ``nthread``
    0 uses all cores. Written to a temporary file next to ``dst`` and renamed.
    """
    if qtype not in QUANT_TYPES:
        raise UnsupportedExportError(f"quantisation type {qtype!r} is not one of {', '.join(QUANT_TYPES)}")
    llama_cpp = llama_cpp_module()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: export the model first (gqaprune export-gguf)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = nthread
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not quantise {src} to {qtype} (return code {rc}); see its log above")
    return dst


def iter_gguf_layers(path: str | os.PathLike) -> Iterator[dict]:
    """Per-layer head counts and FFN widths recorded in a GGUF file (for reports and tests)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    n = int(r.fields[f"{arch}.block_count"].contents())

    def per_layer(key: str) -> list[int]:
        v = r.fields[f"{arch}.{key}"].contents()
        return [int(x) for x in v] if isinstance(v, list) else [int(v)] * n

    for i, (h, kv, ff) in enumerate(zip(per_layer("attention.head_count"), per_layer("attention.head_count_kv"),
                                        per_layer("feed_forward_length"), strict=True)):
        yield {"layer": i, "heads": h, "kv_heads": kv, "ffn": ff}

# ------------------------------------------------------------------------------------------------
# running the exported file in llama.cpp (verification and benchmarks)
# ------------------------------------------------------------------------------------------------
def load_llama(path: str | os.PathLike, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = True,
               vocab_only: bool = False, kv_f32: bool = True):
    """A ``llama_cpp.Llama`` on the GGUF ``path`` (CPU, quiet); ``logits_all`` keeps every position's logits.

    ``kv_f32``: keep the KV cache in float32 (llama.cpp's default is float16, which alone moves logits by
    ~1e-3 and would hide what the export itself gets right or wrong); False for llama.cpp's defaults.
    ``n_threads``: None lets llama-cpp-python choose from the machine's cores.
    """
    llama_cpp = llama_cpp_module()
    kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_f32 else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads,
                           n_threads_batch=n_threads, logits_all=logits_all, vocab_only=vocab_only, verbose=False,
                           **kv)


def llama_cpp_logits(llm, ids: list[int] | np.ndarray | torch.Tensor) -> np.ndarray:
    """llama.cpp's logits ``[len(ids), vocab]`` (float32) for the token ids ``ids`` fed from position 0."""
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    if len(ids) > llm.n_ctx():
        raise ValueError(f"{len(ids)} tokens do not fit the context of {llm.n_ctx()}; load with a larger n_ctx")
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def window_nll(logits: np.ndarray | torch.Tensor, ids: np.ndarray | torch.Tensor) -> float:
    """Summed next-token NLL (nats, float64) of one window: ``logits [n, vocab]`` predicting ``ids[1:]``."""
    lg = torch.as_tensor(np.asarray(logits), dtype=torch.float64)[:-1]
    target = torch.as_tensor(np.asarray(ids), dtype=torch.long)[1:]
    return float(torch.nn.functional.cross_entropy(lg, target, reduction="sum"))


def llama_cpp_perplexity(path: str | os.PathLike, windows: torch.Tensor, n_threads: int | None = None) -> float:
    """Perplexity of the GGUF ``path`` in llama.cpp over ``windows [n_windows, seq_len]`` of token ids.

    Each window is evaluated from an empty context and predicts its own tokens 1..seq_len-1, the same
    protocol as :func:`gqaprune.evaluation.perplexity`, so the two numbers are comparable window by window.
    """
    import math

    llm = load_llama(path, n_ctx=int(windows.shape[1]), n_threads=n_threads)
    try:
        total = sum(window_nll(llama_cpp_logits(llm, w), w) for w in windows)
    finally:
        llm.close()
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))
