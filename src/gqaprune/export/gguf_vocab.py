"""The tokenizer of a checkpoint as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary, for the GGUF export.

llama.cpp re-implements each pre-tokenizer by name; :func:`detect_pre_tokenizer` maps a tokenizer.json's
pre-tokenizer to that name (or warns and takes the closest general one), and :func:`read_tokenizer`
reads tokens, merges, token types, special ids and the chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gqaprune.errors import UnsupportedExportError

# Pre-tokenizer regexes as they appear in tokenizer.json files, mapped to the name llama.cpp knows them by.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def detect_pre_tokenizer(pre: dict | None) -> tuple[str, str | None]:
    """The llama.cpp pre-tokenizer name for a tokenizer.json ``pre_tokenizer`` -> (name, warning or None).

    Recognised: GPT-2 byte-level (``gpt-2``), digits split one by one + byte-level (``smollm``, SmolLM's
    original tokenizer), LLaMA-3's split regex (``llama-bpe``), Qwen2's (``qwen2``). Anything else gets
    ``gpt-2`` when it is byte-level, with a warning, since that is the closest general splitter.
    """
    if pre is None:
        return "gpt-2", "tokenizer.json has no pre_tokenizer; assuming GPT-2 byte-level splitting"
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", None
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm", None
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe", None
        if pattern == _QWEN2_SPLIT:
            return "qwen2", None
    if "ByteLevel" in kinds:
        return "gpt-2", (f"pre-tokenizer {kinds} is not one llama.cpp names; wrote 'gpt-2' (GPT-2 byte-level "
                         "splitting): tokenisation may differ from HF on some texts")
    raise UnsupportedExportError(f"tokenizer.json: pre_tokenizer {kinds} is not byte-level BPE; only byte-level BPE "
                                 "tokenizers (LLaMA-3, Qwen2, SmolLM, GPT-2 style) are exported")


@dataclass
class Vocab:
    """What the GGUF header says about the tokenizer."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    warnings: list[str]


def read_tokenizer(model_dir: Path, n_vocab: int) -> Vocab:
    """The HF tokenizer of ``model_dir`` as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary.

    Token types: special added tokens CONTROL, other added tokens USER_DEFINED, the rest NORMAL; ids the
    tokenizer lacks up to the model's vocab size are UNUSED ``[PAD<id>]``. Whether BOS/EOS are added is
    read from what the HF tokenizer itself does on a sample text (that includes tokenizer_config flags).
    """
    from gguf import TokenType
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise UnsupportedExportError(f"{model_dir}: the tokenizer has no tokenizer.json (fast tokenizer); "
                                     "only byte-level BPE tokenizers with a tokenizer.json are exported")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = f"{model.get('type')} model" + (" with byte_fallback (SentencePiece style)"
                                               if model.get("byte_fallback") else "")
        raise UnsupportedExportError(f"{model_dir}/tokenizer.json: {kind} is not exported; only byte-level BPE "
                                     "tokenizers (LLaMA-3, Qwen2, SmolLM, GPT-2 style) are")
    pre, warn = detect_pre_tokenizer(spec.get("pre_tokenizer"))
    warnings = [warn] if warn else []
    norm = (spec.get("normalizer") or {}).get("type")
    if norm in ("NFC", "NFKC"):
        # Qwen2's tokenizer sets NFC; llama.cpp applies no normaliser, which only matters for text not in NFC
        warnings.append(f"tokenizer normalizer {norm} is not applied by llama.cpp: text not already in {norm} "
                        "may tokenise differently")
    elif norm is not None:
        raise UnsupportedExportError(f"{model_dir}/tokenizer.json: normalizer {norm} is set; llama.cpp's byte-level "
                                     "BPE applies none (only NFC/NFKC are accepted, with a warning)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(a["id"]): a for a in spec.get("added_tokens", [])}
    for a in added.values():
        vocab[a["content"]] = int(a["id"])
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise UnsupportedExportError(f"{model_dir}: the tokenizer has {size} ids but the model's vocab_size is "
                                     f"{n_vocab}; resize the embeddings (model.resize_token_embeddings) first")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:
            types[i] = int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            types[i] = int(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    full = tok("a b", add_special_tokens=True)["input_ids"]
    add_bos = tok.bos_token_id is not None and len(full) > len(plain) and full[0] == tok.bos_token_id
    add_eos = tok.eos_token_id is not None and len(full) > len(plain) and full[-1] == tok.eos_token_id
    template = getattr(tok, "chat_template", None)
    return Vocab(tokens, types, merges, pre, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id,
                  tok.pad_token_id, add_bos, add_eos, template if isinstance(template, str) else None, warnings)
