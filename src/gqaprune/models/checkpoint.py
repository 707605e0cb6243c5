"""Writing Hugging Face checkpoints tensor by tensor: safetensors shards streamed from any device.

``save_pretrained`` gathers a whole shard's bytes on the host before writing, so an 8B model saved from
a GPU costs a full host copy first. :class:`CheckpointWriter` writes each tensor as it comes: the next
tensor's device-to-host copy overlaps the disk write of the current one, and at most one tensor (plus
the one in flight) is on the host. The same writer serves the pruned checkpoint, which
:func:`gqaprune.pruning.surgery.save_pruned` builds one decoder layer at a time (on N ranks: gathered from
sharded weights on the main rank, :mod:`gqaprune.runtime.placement`).

The files are the standard layout: ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` with
``model.safetensors.index.json`` when the weights exceed ``max_shard_bytes``. The bytes are a function
of the tensors and their order (headers with sorted keys, no timestamps).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from gqaprune.runtime.devices import SAFETENSORS_CODES

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def _host_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes on the host as a flat uint8 tensor (one device-to-host copy)."""
    t = tensor.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8)


class _Shard:
    """One safetensors file being written: a reserved header region, then tensor data appended."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None):
        self.path = path
        self.header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, t in entries:
            size = t.numel() * t.element_size()
            self.header[name] = {"dtype": SAFETENSORS_CODES[t.dtype], "shape": list(t.shape),
                                 "data_offsets": [offset, offset + size]}
            offset += size
        self.size = offset
        raw = json.dumps(self.header, sort_keys=True, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)))
        self.file.write(raw)

    def close(self) -> None:
        self.file.close()


def write_safetensors(entries: list[tuple[str, torch.Tensor]], path: Path, metadata: dict[str, str] | None = None
                      ) -> None:
    """Write ``entries`` (name, tensor on any device) to one safetensors file, copies overlapping writes.

    ``metadata`` (string values) goes into the header's ``__metadata__`` next to ``format: pt``. The header's
    keys are sorted, so equal tensors and metadata give equal bytes (``safetensors.torch.save_file`` orders
    the metadata differently from one process to the next).
    """
    shard = _Shard(path, entries, metadata)
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(_host_bytes, entries[0][1]) if entries else None
            for i in range(len(entries)):
                data = pending.result()
                pending = pool.submit(_host_bytes, entries[i + 1][1]) if i + 1 < len(entries) else None
                shard.file.write(memoryview(data.numpy()))
    finally:
        shard.close()


class CheckpointWriter:
    """Accumulate (name, tensor) pairs into shards of at most ``max_shard_bytes`` and write them.

    Tensors are held by reference until their shard is written (a shard is written as soon as the next
    tensor would overflow it), so with GPU tensors the host holds at most one tensor at a time.
    Use :meth:`add` for every tensor in order, then :meth:`close`.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 << 30):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; writes the current shard first when this one would overflow it."""
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending.append((name, tensor))
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        path = self.out_dir / f".shard{len(self.written):05d}.tmp"
        write_safetensors(self.pending, path)
        self.written.append((path, [n for n, _ in self.pending]))
        self.pending, self.pending_bytes = [], 0

    def close(self) -> list[Path]:
        """Write the last shard, give the shards their final names (and the index); returns the files."""
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        if n == 1:
            final = [self.out_dir / SINGLE]
            os.replace(self.written[0][0], final[0])
            return final
        final, weight_map = [], {}
        for i, (path, names) in enumerate(self.written, start=1):
            target = self.out_dir / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, target)
            final.append(target)
            weight_map.update({name: target.name for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return final


def model_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """The tensors a checkpoint stores: parameters (tied ones once) and persistent buffers, in module order."""
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p
    non_persistent = {f"{prefix}.{b}" if prefix else b for prefix, module in model.named_modules()
                      for b in getattr(module, "_non_persistent_buffers_set", ())}
    for name, b in model.named_buffers():
        if name not in non_persistent:
            yield name, b


def architecture(model: nn.Module) -> str:
    """The model's class name as transformers records it (FSDP2 subclasses it as ``FSDP<Class>``)."""
    return next(c.__name__ for c in type(model).__mro__ if not c.__module__.startswith("torch."))


def save_model(model: nn.Module, out_dir: str | Path, max_shard_bytes: int = 5 << 30,
               tensors: Iterable[tuple[str, torch.Tensor]] | None = None, config=None) -> None:
    """Save ``model``'s config, generation config and weights (streamed) into ``out_dir`` (must be fresh).

    ``tensors`` ((name, tensor) pairs in order; default :func:`model_tensors` of ``model``) and ``config``
    (default ``model.config``) let a caller stream other weights under ``model``'s architecture and
    dtype: the pruned checkpoint built one decoder layer at a time (:func:`gqaprune.pruning.surgery.save_pruned`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config if config is None else config
    config.architectures = [architecture(model)]  # as save_pretrained records them
    config.dtype = next(model.parameters()).dtype
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(out_dir)
    writer = CheckpointWriter(out_dir, max_shard_bytes)
    for name, tensor in model_tensors(model) if tensors is None else tensors:
        writer.add(name, tensor)
    writer.close()
