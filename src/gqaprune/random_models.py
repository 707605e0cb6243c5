"""Random-weight models of named shapes: tiny ones for tests, real 7-8B shapes for GPU benchmarks.

Shapes are data: each preset is a model_type plus config keys. Tiny presets cover GQA 4:1, 7:1, 3:1
and plain multi-head attention over the three families (Qwen2 with q/k/v biases and an untied head).
"""

from __future__ import annotations

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
