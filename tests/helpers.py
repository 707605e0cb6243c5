"""Shared test helpers: tiny real tokenizers trained in memory (no network), tiny pipeline params, running a
stage in-process and reading its one-line error."""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


def bpe_tokenizer(texts: list[str], vocab_size: int, eos: bool = False, **kwargs) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``texts`` that adds a BOS "<s>" like LLaMA (and has EOS "</s>" if ``eos``)."""
    specials = ["<s>", "</s>"] if eos else ["<s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    if eos:
        kwargs["eos_token"] = "</s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", **kwargs)


SAMPLE_TEXT = (
    " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . "
    "He had a guest @-@ starring role on the television series The Bill in 2000 . "
    "no it was n't black monday but while the new york stock exchange did n't fall apart "
    "the dow jones industrial average plunged N points . The three primary colors are red , blue . "
) * 20


def small_tokenizer() -> PreTrainedTokenizerFast:
    """The data / evaluation tests' tokenizer: vocab 300 over SAMPLE_TEXT, BOS "<s>", max length 128."""
    return bpe_tokenizer([SAMPLE_TEXT], 300, model_max_length=128)


def make_pipeline_tokenizer(data_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE (vocab 512) trained on a little real text; BOS "<s>" added, EOS "</s>" for LoRA."""
    from gqaprune.data.instructions import PROMPT_NO_INPUT, PROMPT_WITH_INPUT

    wiki = (data_dir / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8")[:100_000]
    ptb = (data_dir / "ptb" / "ptb.valid.txt").read_text(encoding="utf-8")[:50_000]
    return bpe_tokenizer([wiki, ptb, PROMPT_WITH_INPUT * 5, PROMPT_NO_INPUT * 5], 512, eos=True)


def tiny_params(model_dir: Path, data_dir: Path) -> dict:
    """params.yaml for the tiny model: every knob small, CPU only."""
    return {
        "data": {"data_dir": str(data_dir)},
        "prepare": {"model": str(model_dir), "trust_remote_code": False},
        "calibrate": {"mix": "auto", "n_samples": 8, "seq_len": 32, "seed": 0, "heldout_windows": 4,
                      "heldout_datasets": ["wikitext2", "ptb"]},
        "allocate": {"mode": "auto", "criterion": "kl", "candidates": ["T0", "T1-tauinf", "uniform"],
                   "batch_size": 8, "dtype": "float32", "device": "cpu"},
        "score": {"metrics": ["taylor", "taylor_2nd", "wanda", "magnitude"], "gradient_batch_size": 4,
                  "gradient_checkpointing": False, "dtype": "float32", "device": "cpu"},
        "similarity": {"batch_size": 8, "dtype": "float32", "device": "cpu"},
        "plan": {"ratio": 0.2, "importance": "taylor", "strategy": "hgsp", "temperature": 1.0, "tau": None,
                 "epsilon": 0.0, "freeze_first_n_layers": 0, "freeze_last_n_layers": 0, "mlp_align": 8},
        "surgery": {"compensation": "lstsq", "ridge": 0.01, "batch_size": 8, "dtype": "float32", "device": "cpu"},
        "finetune": {"enabled": True, "method": "lora", "mix": {"alpaca": 0.5, "wikitext2": 0.5},
                     "r": 4, "alpha": 8, "dropout": 0.0, "lr": 1.0e-3,
                     "epochs": 1, "max_steps": 2, "batch_size": 2, "max_length": 128, "n_records": 8,
                     "merge": True, "dtype": "float32", "device": "cpu"},
        "evaluate": {"datasets": ["wikitext2", "ptb"], "seq_len": 64, "max_tokens": 256, "spread": True,
                     "humaneval_problems": 2, "humaneval_max_new_tokens": 16, "instruction_records": 4,
                     "instruction_max_length": 64, "instruction_dataset": "alpaca", "generation_max_new_tokens": 8,
                     "batch_size": 4,
                     "dtype": "float32", "device": "cpu"},
        "export": {"enabled": True, "source": "auto", "dtype": "f16", "quantize": ["Q8_0"], "ffn_multiple": 32},
    }


def tiny_model_folder(folder: Path, data_dir: Path, preset: str = "tiny-llama-gqa4") -> Path:
    """Save a tiny random model of ``preset`` with the pipeline tokenizer into ``folder``."""
    from gqaprune.models.random_models import build_model

    tokenizer = make_pipeline_tokenizer(data_dir)
    model = build_model(preset, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_project(base: Path, data_dir: Path, name: str) -> tuple[Path, dict]:
    """An empty project folder ``base/name`` beside a tiny random model ``base/tiny-model``, and its params."""
    model_dir = tiny_model_folder(base / "tiny-model", data_dir)
    root = base / name
    root.mkdir()
    return root, tiny_params(model_dir, data_dir)


def run(stage: str, capsys, *overrides: str) -> tuple[int, str]:
    """Run a stage in-process (what ``stages/<name>.py`` does); returns (exit code, stderr)."""
    from gqaprune.pipeline.runner import execute

    capsys.readouterr()
    code = execute(stage, None, Path("params.yaml"), list(overrides), False)
    return code, capsys.readouterr().err


def error_line(stderr: str) -> str:
    """The stage's error output: exactly one line starting with 'error:' and no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or the file itself) with its content ({} when it does not exist)."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}
