"""Model fingerprints: a stable id of a model's geometry and every weight, from memory or from its files.

:func:`fingerprint` hashes every weight rounded to bfloat16 (so fp32 and bf16 copies of one
checkpoint agree) plus the geometry; :func:`fingerprint_files` computes the same value streaming
from safetensors files (several GB never held at once) and refuses NaN / infinite weights, naming
the tensor. Every artifact of the pipeline records the fingerprint of the model it was made from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from gqaprune.errors import InputError, NonFiniteError
from gqaprune.models.adapters import get_adapter
from gqaprune.models.loading import meta_model
from gqaprune.models.modules import all_finite, layer_of
from gqaprune.models.sources import safetensors_files


def _tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """sha256 of a tensor's name, shape and values rounded to bfloat16; refuses non-finite values."""
    t = tensor.detach()
    if t.is_floating_point() and not bool(all_finite(t)):
        raise NonFiniteError(f"non-finite weight {name}{layer_of(name)}: it holds NaN or infinity; the model is "
                             "corrupt: re-create or re-download it")
    if t.is_floating_point():
        t = t.to(torch.bfloat16)
    data = t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    h = hashlib.sha256(f"{name}:{tuple(tensor.shape)}".encode())
    h.update(memoryview(data))
    return h.digest()


def _combine(config, digests: Iterable[tuple[str, bytes]]) -> str:
    """The fingerprint: geometry + every tensor digest in name order, 16 hex characters."""
    h = hashlib.sha256()
    geometry = get_adapter(config).geometry(config).to_dict()
    h.update(json.dumps(geometry, sort_keys=True).encode())
    for name, digest in sorted(digests):
        h.update(name.encode())
        h.update(digest)
    return h.hexdigest()[:16]


def fingerprint(model: nn.Module) -> str:
    """A stable id of a model's geometry and every weight (rounded to bfloat16, so fp32 and bf16 agree).

    Equals :func:`fingerprint_files` of the checkpoint the model was loaded from. Refuses NaN or
    infinite weights, naming the tensor.
    """
    params = dict(model.named_parameters())  # tied weights once, under their first name
    return _combine(model.config, ((n, _tensor_digest(n, p)) for n, p in params.items()))


def fingerprint_files(folder: str | Path, config, threads: int | None = None) -> str:
    """:func:`fingerprint` of the checkpoint in ``folder``, streamed from its safetensors files.

    Tensors are read one at a time (memory-mapped) by a pool of ``threads`` (default: CPU count, at
    most 16); torch conversion and sha256 release the GIL, so an 8B checkpoint hashes in seconds.
    Only the model's parameters count (a stored buffer or a stored copy of a tied head is skipped),
    so the value equals :func:`fingerprint` of the loaded model.
    """
    from safetensors import safe_open

    folder = Path(folder)
    wanted = set(dict(meta_model(config).named_parameters()))
    items, found = [], set()
    for file in safetensors_files(folder):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                if name in wanted and name not in found:
                    items.append((file, name))
                    found.add(name)
    missing = sorted(wanted - found)
    if missing:
        raise InputError(f"the weight files of {folder} lack {len(missing)} parameters of the model "
                         f"(e.g. {missing[0]}); the checkpoint is incomplete")

    def digest(item: tuple[Path, str]) -> tuple[str, bytes]:
        file, name = item
        with safe_open(str(file), "pt") as f:
            return name, _tensor_digest(name, f.get_tensor(name))

    intra = torch.get_num_threads()
    torch.set_num_threads(1)  # one tensor per thread: torch's own pool would oversubscribe the cores
    try:
        with ThreadPoolExecutor(max_workers=threads or min(16, os.cpu_count() or 1)) as pool:
            return _combine(config, pool.map(digest, items))
    finally:
        torch.set_num_threads(intra)
