"""A llama-architecture GGUF file as a Hugging Face LLaMA model (the embedded default model's path in).

transformers can load a GGUF (``from_pretrained(..., gguf_file=...)``), but it parses the file's
metadata three times and builds its name map for every tensor: 40 s on 2 CPU cores for the 98 MB
SmolLM2 file, most of the ``prepare`` stage. Here the file is read once with the ``gguf`` package
(llama.cpp's own reader), every tensor de-quantised with ``gguf.quants`` and renamed by the llama
architecture's fixed table; the tokenizer still comes from transformers' GGUF tokenizer conversion.

llama.cpp's converter stores the q and k rows of each head in pair-interleaved order (its RoPE
rotates adjacent pairs; Hugging Face rotates the two halves of a head): the rows are put back here,
the inverse of :func:`gqaprune.export.gguf_tensors.rope_pairs_order`, which writes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gqaprune.errors import InputError

__all__ = ["gguf_llama_config", "read_gguf_llama"]

#: GGUF tensor name (inside ``blk.N.``) -> Hugging Face name (inside ``model.layers.N.``)
_BLOCK = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_llama_config(reader):
    """The ``LlamaConfig`` that a llama-architecture GGUF's metadata describes."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise InputError(f"only llama-architecture GGUF files are read here, this one is {arch!r}")
    get = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    heads = int(get("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    hidden = int(get("embedding_length"))
    head_dim = int(get("rope.dimension_count") or hidden // heads)
    token_id = lambda key: _field(reader, f"tokenizer.ggml.{key}")  # noqa: E731
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        max_position_embeddings=int(get("context_length")), rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in names, bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"), pad_token_id=token_id("padding_token_id"),
        unk_token_id=token_id("unknown_token_id"), dtype="float32",
    )


def _unpair(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """q / k rows from llama.cpp's pair-interleaved order back to Hugging Face's half-split order.

    ``rows`` ``[n_heads * head_dim, in]``; llama.cpp's row ``h, 2 i + j`` is Hugging Face's row
    ``h, j * head_dim / 2 + i``."""
    out, width = rows.shape
    return rows.reshape(n_heads, out // n_heads // 2, 2, width).swapaxes(1, 2).reshape(out, width)


def read_gguf_llama(path: str | Path) -> tuple[object, dict[str, torch.Tensor]]:
    """(``LlamaConfig``, float32 state dict with Hugging Face names) of a llama-architecture GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    config = gguf_llama_config(reader)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        values = values.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF lists the fastest axis first
        parts = t.name.split(".")
        if parts[0] == "blk":
            kind = parts[2]
            if kind not in _BLOCK:
                raise InputError(f"{path}: tensor {t.name} has no Hugging Face LLaMA counterpart")
            if kind in ("attn_q", "attn_k"):
                values = _unpair(values, config.num_attention_heads if kind == "attn_q" else config.num_key_value_heads)
            name = f"model.layers.{parts[1]}.{_BLOCK[kind]}.{parts[3]}"
        elif parts[0] in _TOP:
            name = f"{_TOP[parts[0]]}.{parts[1]}"
        else:  # e.g. rope_freqs (llama-3 rope scaling), which this reader does not carry into the config
            raise InputError(f"{path}: tensor {t.name} has no Hugging Face LLaMA counterpart")
        state[name] = torch.tensor(values)  # a copy: float32 tensors of the file are read-only memory maps
    return config, state
