"""The shape of a checkpoint as llama.cpp sees it: dense facts, per-layer shapes, placeholders, architecture.

Which llama.cpp architecture, and why (read in the llama.cpp that ``llama-cpp-python==0.3.36`` bundles):

* every layer the same shape -> the family's own graph (``llama`` for LLaMA and Mistral, ``qwen2``;
  :attr:`gqaprune.models.adapters.FamilyAdapter.gguf_arch`);
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
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from gqaprune.errors import UnsupportedExportError
from gqaprune.models.adapters import ADAPTERS, FamilyAdapter, Geometry, get_adapter

#: MLP width (channels) of the zero placeholder written for an emptied MLP whose layer keeps attention.
#: 32 is the block size of Q8_0 / Q4_0, so the placeholder quantises without a fallback type.
PLACEHOLDER_FFN = 32
SUPPORTED_ROPE = ("default", "linear", "llama3")


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
class GGUFModel:
    """What the GGUF header needs of a dense model: the family adapter with its geometry
    (:class:`gqaprune.models.adapters.Geometry`), context length, RMS-norm epsilon and RoPE settings
    (``rope`` as in the HF config)."""

    adapter: FamilyAdapter
    dense: Geometry
    sliding_window: int | None = None  # an attention window llama.cpp ignores (exported with a warning)
    n_ctx: int = 4096
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope: dict = field(default_factory=dict, hash=False)


def read_checkpoint_json(path: Path) -> dict:
    """A JSON file of the checkpoint folder (config, index); refuses a folder without it, naming the file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UnsupportedExportError(f"{path} not found: the export needs an HF model folder "
                                     "(config.json, model.safetensors, tokenizer files)") from None


def read_geometry(config: dict, config_path: str = "config.json") -> GGUFModel:
    """Dense geometry from a config dict (through the family's adapter); refuses families, RoPE types
    and sliding windows llama.cpp's graphs lack."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if model_type not in ADAPTERS:
        raise UnsupportedExportError(f"{config_path}: model_type {model_type!r} cannot be exported to GGUF; "
                                     f"supported families: {', '.join(sorted(ADAPTERS))}")
    hf_config = AutoConfig.for_model(**config)
    adapter = get_adapter(hf_config)
    # transformers 5 keeps RoPE settings in rope_parameters; older configs use rope_theta + rope_scaling
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE:
        raise UnsupportedExportError(f"{config_path}: rope type {rope_type!r} is not exported; supported: "
                                     f"{', '.join(SUPPORTED_ROPE)}")
    rope["rope_type"] = rope_type
    window = adapter.sliding_window(hf_config)
    if window and not adapter.sliding_window_exportable:
        raise UnsupportedExportError(f"{config_path}: a sliding attention window ({window}) is not supported by "
                                     f"llama.cpp's {adapter.gguf_arch}/deci graphs; export a model trained without it")
    return GGUFModel(adapter, adapter.geometry(hf_config), sliding_window=window,
                     n_ctx=int(config.get("max_position_embeddings") or 4096),
                    rms_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope=rope)


def layer_specs(config: dict, geo: GGUFModel) -> list[LayerSpec]:
    """Per-layer shapes of the checkpoint, before any placeholder is chosen."""
    specs = config.get("gqaprune_layers")
    if not specs:
        return [LayerSpec(i, i, geo.dense.num_kv_heads, geo.dense.num_heads, geo.dense.intermediate_size)
                for i in range(int(config["num_hidden_layers"]))]
    if len(specs) != int(config["num_hidden_layers"]):
        raise UnsupportedExportError(f"config.json: gqaprune_layers has {len(specs)} entries for "
                                     f"num_hidden_layers={config['num_hidden_layers']}; re-save the checkpoint")
    out = []
    for i, s in enumerate(specs):
        kv, ffn = int(s["num_key_value_heads"]), int(s["intermediate_size"])
        out.append(LayerSpec(i, int(s.get("source_layer", i)), kv, kv * geo.dense.q_per_kv, ffn))
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


def choose_arch(geo: GGUFModel, layers: list[LayerSpec], extra_bias: bool) -> str:
    """``llama`` / ``qwen2`` when one shape fits every layer, else ``deci`` (per-layer shapes).

    llama.cpp's ``qwen2`` sizes q and o as hidden x hidden and has no o / MLP biases, so a Qwen2 model
    whose heads x head_dim differ from hidden_size, or that gained such biases, goes to ``deci`` too.
    """
    shapes = {(s.kv_heads, s.ffn) for s in layers}
    uniform = len(shapes) == 1 and all(s.kv_heads > 0 and s.ffn > 0 for s in layers)
    if not uniform:
        return "deci"
    if geo.adapter.gguf_fixed_shapes:
        heads = layers[0].heads
        fits = (heads * geo.dense.head_dim == geo.dense.hidden_size and not extra_bias
                and geo.rope["rope_type"] != "llama3")
        return geo.adapter.gguf_arch if fits else "deci"  # qwen2 has no rope_freqs tensor either
    return geo.adapter.gguf_arch
