"""The GGUF reader of the embedded model's path: a llama GGUF written by our exporter reads back as the same model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from gqaprune.errors import InputError
from gqaprune.export.gguf import export_gguf
from gqaprune.models.gguf_import import read_gguf_llama
from gqaprune.models.random_models import build_model
from gqaprune.pruning.surgery import save_pruned

sys.path.insert(0, str(Path(__file__).parent))
from helpers import small_tokenizer  # noqa: E402


@pytest.mark.parametrize("preset", ["tiny-llama-gqa4", "tiny-llama-gqa3"])
def test_f32_export_reads_back_exactly(tmp_path, preset):
    """Every weight comes back bit for bit under its Hugging Face name (q / k rows in their original order,
    which the exporter pair-interleaves), and the config has the model's geometry."""
    tokenizer = small_tokenizer()
    model = build_model(preset, vocab_size=len(tokenizer))
    save_pruned(model, tokenizer, tmp_path / "model")
    export_gguf(tmp_path / "model", tmp_path / "m.gguf", dtype="f32")
    config, state = read_gguf_llama(tmp_path / "m.gguf")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(model.config, key), key
    assert abs(config.rms_norm_eps - model.config.rms_norm_eps) < 1e-9
    tied = config.tie_word_embeddings
    expected = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and tied)}
    assert set(state) == set(expected)
    for name, value in expected.items():
        assert torch.equal(state[name], value.float()), name


def test_other_architectures_are_refused(tmp_path):
    """A file of another architecture is named, not misread."""
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "q.gguf", "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match="qwen2"):
        read_gguf_llama(tmp_path / "q.gguf")
