"""The GGUF tensors of a checkpoint, planned from the safetensors headers and made one at a time.

``deci`` and ``llama`` use llama.cpp's "normal" RoPE (rotates adjacent pairs); HF's LLaMA, Mistral and
Qwen2 rotate the two halves of each head (``rotate_half``), so q/k rows (and q/k biases) are re-ordered
inside each head: row ``2i`` <- ``i``, row ``2i+1`` <- ``i + head_dim/2`` (:func:`rope_pairs_order`).
The ``qwen2`` architecture rotates halves itself and gets the rows unchanged. Placeholder blocks are
written as exact zeros; padded MLP channels as zero rows / columns.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gqaprune.errors import UnsupportedExportError
from gqaprune.export.gguf_layers import GGUFModel, LayerSpec, read_checkpoint_json
from gqaprune.models.checkpoint import INDEX, SINGLE


class Checkpoint:
    """Name -> (file, shape, dtype) of the safetensors tensors, read from the headers only."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        index = model_dir / INDEX
        if index.is_file():
            files = sorted(set(read_checkpoint_json(index)["weight_map"].values()))
        elif (model_dir / SINGLE).is_file():
            files = [SINGLE]
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
class Tensor:
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


def plan_tensors(ckpt: Checkpoint, geo: GGUFModel, layers: list[LayerSpec], arch: str, dtype: str,
                  ) -> list[Tensor]:
    """Every tensor of the GGUF file in write order, checked against the checkpoint before anything is written."""
    from gguf import GGMLQuantizationType as Q

    wtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16}[dtype]
    used: set[str] = set()
    out: list[Tensor] = []
    permute = arch in ("llama", "deci")  # normal (pair) RoPE in llama.cpp
    d, h = geo.dense.head_dim, geo.dense.hidden_size

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

        out.append(Tensor(gguf_name, gshape, qtype, make))

    def zeros(gguf_name: str, shape: tuple[int, ...]) -> None:
        out.append(Tensor(gguf_name, shape, wtype if len(shape) == 2 else Q.F32,
                           lambda shape=shape: torch.zeros(shape)))

    src("token_embd.weight", "model.embed_tokens.weight", (geo.dense.vocab_size, h))
    for s in layers:
        i, b = s.index, f"blk.{s.index}"
        attn_bias = {}
        if s.attn_placeholder:
            heads = geo.dense.q_per_kv
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
        out.append(Tensor("rope_freqs.weight", tuple(freqs.shape), Q.F32, lambda f=freqs: f))
    src("output_norm.weight", "model.norm.weight", (h,))
    if not geo.dense.tied_embeddings:
        src("output.weight", "lm_head.weight", (geo.dense.vocab_size, h))
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


def _llama3_rope_factors(geo: GGUFModel) -> torch.Tensor:
    """Per-frequency RoPE divisors of LLaMA-3.1's "llama3" scaling, shape (head_dim/2,), as llama.cpp reads them.

    Frequencies whose wavelength exceeds ``original_max_position_embeddings / low_freq_factor`` are
    divided by ``factor``, short wavelengths are kept, and the band between is interpolated smoothly.
    """
    r = geo.rope
    d = geo.dense.head_dim
    inv_freq = 1.0 / (geo.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    factor = float(r.get("factor", 8.0))
    low, high = float(r.get("low_freq_factor", 1.0)), float(r.get("high_freq_factor", 4.0))
    old_ctx = float(r.get("original_max_position_embeddings", 8192))
    wavelen = 2 * torch.pi / inv_freq
    smooth = ((old_ctx / wavelen - low) / (high - low)).clamp(0, 1)
    # divisor 1 for short wavelengths (smooth=1), factor for long ones (smooth=0)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    return divisor.float()


def to_numpy(t: torch.Tensor, qtype: int) -> np.ndarray:
    """float32 data -> the bytes of GGML type ``qtype`` (F32, F16 or BF16) as a numpy array of the same shape."""
    from gguf import GGMLQuantizationType as Q

    t = t.contiguous()
    if qtype == Q.F32:
        return t.float().numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    # numpy has no bfloat16: write its 16-bit patterns (round-to-nearest-even by torch)
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
