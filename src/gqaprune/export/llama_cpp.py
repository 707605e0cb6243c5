"""llama.cpp through llama-cpp-python: its own quantiser, and running an exported file (checks, benchmarks)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gqaprune.config.choices import GGUF_QUANT_TYPES
from gqaprune.errors import UnsupportedExportError
from gqaprune.runtime.files import atomic_path


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

    ``qtype``: one of :data:`gqaprune.config.choices.GGUF_QUANT_TYPES` (e.g. "Q8_0", "Q4_K_M", "Q4_0"); tensors
    whose row length does
    not fit the type's block are given a compatible type by llama.cpp (it logs a fallback). ``nthread``
    0 uses all cores. Written to a temporary file next to ``dst`` and renamed.
    """
    if qtype not in GGUF_QUANT_TYPES:
        raise UnsupportedExportError(f"quantisation type {qtype!r} is not one of {', '.join(GGUF_QUANT_TYPES)}")
    llama_cpp = llama_cpp_module()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src} not found: export the model first (gqaprune export-gguf)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_QUANT_TYPES[qtype]
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
    protocol as :func:`gqaprune.evaluation.perplexity.perplexity`, so the two numbers are comparable window by window.
    """
    import math

    llm = load_llama(path, n_ctx=int(windows.shape[1]), n_threads=n_threads)
    try:
        total = sum(window_nll(llama_cpp_logits(llm, w), w) for w in windows)
    finally:
        llm.close()
    return math.exp(total / (windows.shape[0] * (windows.shape[1] - 1)))
