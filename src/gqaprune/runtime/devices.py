"""Devices and dtypes: the torch dtype of a params name, 'auto' devices, how much memory a device offers."""

from __future__ import annotations

from pathlib import Path

import torch

from gqaprune.config.choices import DTYPES

#: safetensors dtype code of each torch dtype (a safetensors header's "dtype" field)
SAFETENSORS_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                     torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
#: safetensors dtype code of each params dtype name
SAFETENSORS_DTYPES = {name: SAFETENSORS_CODES[getattr(torch, name)] for name in DTYPES}
#: the codes of floating-point tensors
SAFETENSORS_FLOAT_CODES = frozenset(code for dtype, code in SAFETENSORS_CODES.items() if dtype.is_floating_point)


def torch_dtype(name: str) -> torch.dtype:
    """Map a params string ('float32', 'bfloat16', 'float16') to a torch dtype."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {list(DTYPES)}")
    return getattr(torch, name)


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' picks CUDA when present; anything else is passed to torch.device."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def available_host_bytes() -> int:
    """Memory the host can still give (MemAvailable of /proc/meminfo; a very large number where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def device_memory_bytes(device: torch.device | str | None, ranks_on_host: int = 1) -> int:
    """Memory one process may use on ``device``: the GPU's total, or the available RAM / ranks on the host."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return available_host_bytes() // max(ranks_on_host, 1)
