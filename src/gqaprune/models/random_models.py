"""Random-weight models of named shapes: tiny ones for tests, real 7-8B and 70B shapes for GPU benchmarks.

Shapes are data: each preset is a model_type plus config keys. Tiny presets cover GQA 4:1, 7:1, 3:1
and plain multi-head attention over the three families (Qwen2 with q/k/v biases and an untied head).
:func:`build_model` materialises a model; :func:`write_random_checkpoint` writes a checkpoint tensor by
tensor instead (LLaMA-3-70B, 141 GB in bf16, without holding it), to be *loaded* like a real one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

PRESETS: dict[str, tuple[str, dict]] = {
    # tiny, for CPU tests (head_dim 8, 3-4 layers)
    "tiny-llama-gqa4": ("llama", dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                      intermediate_size=96, num_hidden_layers=4, tie_word_embeddings=False)),
    "tiny-llama-gqa3": ("llama", dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                      intermediate_size=80, num_hidden_layers=3, tie_word_embeddings=True)),
    "tiny-qwen2-gqa7": ("qwen2", dict(hidden_size=56, num_attention_heads=7, num_key_value_heads=1,
                                      intermediate_size=72, num_hidden_layers=3, tie_word_embeddings=False)),
    "tiny-mistral-mha": ("mistral", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                         intermediate_size=64, num_hidden_layers=3, tie_word_embeddings=False,
                                         sliding_window=None)),
    # real shapes, for GPU benchmarks
    "llama3-8b": ("llama", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                intermediate_size=14336, num_hidden_layers=32, vocab_size=128256,
                                rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)),
    "llama3-70b": ("llama", dict(hidden_size=8192, num_attention_heads=64, num_key_value_heads=8,
                                 intermediate_size=28672, num_hidden_layers=80, vocab_size=128256,
                                 rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                                 intermediate_size=18944, num_hidden_layers=28, vocab_size=152064,
                                 max_position_embeddings=32768, tie_word_embeddings=False)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                   intermediate_size=14336, num_hidden_layers=32, vocab_size=32768,
                                   sliding_window=None, tie_word_embeddings=False)),
}
TINY_PRESETS = [name for name in PRESETS if name.startswith("tiny-")]


def build_config(preset: str, vocab_size: int | None = None, **overrides):
    """The HF config of a preset (``vocab_size`` and other keys may be overridden)."""
    from transformers import AutoConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    model_type, keys = PRESETS[preset]
    keys = {"vocab_size": 128, **keys, **overrides}
    if vocab_size is not None:
        keys["vocab_size"] = vocab_size
    return AutoConfig.for_model(model_type, **keys)


def build_model(preset: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
                vocab_size: int | None = None, **overrides):
    """A deterministic random-weight causal LM of the preset's shape, in eval mode.

    Weights are drawn N(0, 0.02) by HF's initialiser; biases (Qwen2) and norm weights are then
    perturbed so that every parameter matters to the output (zero biases would hide bias bugs).
    """
    from transformers import AutoModelForCausalLM

    config = build_config(preset, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                noise = torch.randn(p.shape, generator=gen) * 0.1
                p.add_(noise.to(device=p.device, dtype=p.dtype))
    return model.eval()


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def random_tensor(name: str, shape, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu"
                  ) -> torch.Tensor:
    """The value :func:`write_random_checkpoint` gives tensor ``name``: weights N(0, 0.02), norm weights
    1 + N(0, 0.1), biases N(0, 0.1) (as :func:`build_model`), from a generator seeded by ``seed`` and the name."""
    gen = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
    t = torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)
    t = 1.0 + 0.1 * t if "norm" in name else (0.1 * t if name.endswith("bias") else 0.02 * t)
    return t.to(dtype)


def write_random_checkpoint(out_dir: str | Path, preset: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            max_shard_bytes: int = 5 << 30, device: str | torch.device = "cpu", **overrides) -> Path:
    """Write a random checkpoint of ``preset`` (config + sharded safetensors + index) to ``out_dir``.

    The model is built on the meta device and every tensor drawn on its own (``device``: ``cuda`` draws
    a 70B much faster) and streamed through :func:`gqaprune.models.checkpoint.save_model`, so at most one
    safetensors file of tensors is held. A tensor's values do not depend on the file layout.
    """
    from gqaprune.models.checkpoint import model_tensors, save_model
    from gqaprune.models.loading import meta_model
    from gqaprune.runtime.files import atomic_dir

    model = meta_model(build_config(preset, **overrides), dtype=dtype)
    tensors = ((name, random_tensor(name, t.shape, dtype, seed, device)) for name, t in model_tensors(model))
    with atomic_dir(out_dir) as tmp:
        save_model(model, tmp, max_shard_bytes, tensors=tensors)
    return Path(out_dir)
