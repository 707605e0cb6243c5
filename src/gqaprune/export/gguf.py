"""Export a (pruned) checkpoint folder to one GGUF file for llama.cpp, with its tokenizer and chat template.

Input: a normal HF folder (``config.json``, ``model.safetensors`` or a sharded index, tokenizer files),
dense or pruned by :mod:`gqaprune.pruning.surgery`, optionally with ``config.gqaprune_layers`` (per-layer KV
heads and MLP widths; see ``hf_code/modeling_gqaprune.py``). Which llama.cpp architecture a checkpoint
becomes, and the placeholder encodings of emptied blocks, are :mod:`gqaprune.export.gguf_layers`; the
tensors and their RoPE row order :mod:`gqaprune.export.gguf_tensors`; the vocabulary
:mod:`gqaprune.export.gguf_vocab`; quantising with llama.cpp's own quantiser
:mod:`gqaprune.export.llama_cpp`.

Tensors are streamed: metadata and tensor infos are written first from the safetensors headers, then
one tensor at a time is read (``safe_open``), converted and appended, so peak memory is about one
tensor. The file is written next to the destination under a temporary name and renamed into place
(never written through an existing file, which may be a hard link into a DVC cache). Equal inputs give
byte-identical files (no timestamps, fixed order).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from gqaprune.config.choices import GGUF_DTYPES
from gqaprune.errors import UnsupportedExportError
from gqaprune.export.gguf_layers import (
    choose_arch,
    encode_layers,
    layer_specs,
    pad_ffn,
    read_checkpoint_json,
    read_geometry,
)
from gqaprune.export.gguf_tensors import Checkpoint, plan_tensors, to_numpy
from gqaprune.export.gguf_vocab import read_tokenizer
from gqaprune.runtime.files import atomic_path


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
    if dtype not in GGUF_DTYPES:
        raise UnsupportedExportError(f"dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    if ffn_multiple < 1:
        raise UnsupportedExportError(f"ffn_multiple must be >= 1, got {ffn_multiple}")
    model_dir, out = Path(model_dir), Path(out_path)
    config = read_checkpoint_json(model_dir / "config.json")
    geo = read_geometry(config, str(model_dir / "config.json"))
    raw = layer_specs(config, geo)
    ckpt = Checkpoint(model_dir)
    extra_bias = any(n.endswith(("o_proj.bias", "down_proj.bias", "gate_proj.bias", "up_proj.bias"))
                     for n in ckpt.shapes)
    arch = choose_arch(geo, raw, extra_bias)
    layers = encode_layers(raw, geo.dense.q_per_kv) if arch == "deci" else raw
    layers = [pad_ffn(s, ffn_multiple) for s in layers]
    warnings: list[str] = []
    sliding = geo.sliding_window
    if sliding and sliding < geo.n_ctx:
        warnings.append(f"sliding_window={sliding}: llama.cpp attends to the whole context, so outputs agree "
                        f"with HF for sequences up to {sliding} tokens only")
    tensors = plan_tensors(ckpt, geo, layers, arch, dtype)
    vocab = read_tokenizer(model_dir, geo.dense.vocab_size)
    warnings += vocab.warnings

    writer = gguf.GGUFWriter(None, arch)
    writer.add_name(name or model_dir.resolve().name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    writer.add_context_length(geo.n_ctx)
    writer.add_embedding_length(geo.dense.hidden_size)
    writer.add_block_count(len(layers))
    if arch == "deci":
        writer.add_feed_forward_length([s.ffn for s in layers])
        writer.add_head_count([s.heads for s in layers])
        writer.add_head_count_kv([s.kv_heads for s in layers])
    else:
        writer.add_feed_forward_length(layers[0].ffn)
        writer.add_head_count(layers[0].heads)
        writer.add_head_count_kv(layers[0].kv_heads)
    writer.add_key_length(geo.dense.head_dim)
    writer.add_value_length(geo.dense.head_dim)
    writer.add_rope_dimension_count(geo.dense.head_dim)
    writer.add_rope_freq_base(geo.rope_theta)
    if geo.rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(geo.rope["factor"]))
    writer.add_layer_norm_rms_eps(geo.rms_eps)
    writer.add_vocab_size(geo.dense.vocab_size)
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
                writer.write_tensor_data(to_numpy(data, t.qtype))
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


def _gguf_module():
    """The ``gguf`` package (GGUF writer), or an error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise UnsupportedExportError("the GGUF export needs the gguf package: pip install gguf==0.19.0 "
                                     "(scripts/install.sh installs it)") from None
    return gguf
