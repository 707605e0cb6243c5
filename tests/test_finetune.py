"""Tests for gqaprune.recovery.lora: the records' encoding, LoRA recovery on tiny (pruned) random models, merge/save."""

import copy
import dataclasses

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerFast

from gqaprune.data.instructions import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, format_prompt
from gqaprune.data.sources import load_instructions
from gqaprune.evaluation.instructions import instruction_nll
from gqaprune.models.hf_code.modeling_gqaprune import EmptyAttention
from gqaprune.models.loading import load_model
from gqaprune.models.random_models import build_model
from gqaprune.models.units import LayerKeep
from gqaprune.pruning.surgery import prune_model, save_pruned
from gqaprune.recovery.lora import (
    IGNORE_INDEX,
    FinetuneConfig,
    collate,
    encode_example,
    finetune_lora,
    merge_adapter,
    save_adapter,
)
from helpers import bpe_tokenizer

_TRAIN_TEXT = (
    PROMPT_WITH_INPUT + PROMPT_NO_INPUT
    + "Give three tips for staying healthy. Eat a balanced diet and exercise regularly. "
    "What are the three primary colors? The three primary colors are red, blue, and yellow. "
    "Describe the structure of an atom. An atom is made up of a nucleus and electrons. "
) * 10

FAST = dict(dropout=0.0, lr=1e-2, max_length=128, batch_size=4, epochs=3.0)  # tiny, quick, high-lr settings


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE (vocab 500) trained in memory; adds a BOS "<s>" like LLaMA, EOS "</s>"."""
    return bpe_tokenizer([_TRAIN_TEXT], 500, eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train far faster on one thread (2-thread BLAS thrashes on a shared 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def records(data_dir):
    """A few real Alpaca records with short responses (with and without input), for speed."""
    rows = load_instructions(data_dir=data_dir)
    short = [r for r in rows if len(r["output"]) <= 200 and len(r["input"]) <= 100]
    assert any(r["input"] for r in short[:8]) and any(not r["input"] for r in short[:8])
    return short[:8]


def pruned_model(tokenizer):
    """tiny-llama-gqa4 with layer 0's attention emptied and narrower, different MLPs in layers 0 and 2."""
    model = build_model("tiny-llama-gqa4", vocab_size=len(tokenizer))
    prune_model(model, {
        0: LayerKeep(attn=[], mlp=list(range(0, 96, 2))),  # attention gone, MLP 96 -> 48
        2: LayerKeep(attn=[1], mlp=list(range(40))),       # 1 of 2 KV groups, MLP 96 -> 40
    })
    assert isinstance(model.model.layers[0].self_attn, EmptyAttention)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def lora_modules(peft_model):
    return {name: m for name, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


# ----------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------


def test_labels_mask_the_prompt(tokenizer):
    record = {"instruction": "What are the three primary colors?", "input": "",
              "output": "Red, blue and yellow."}
    prompt = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat are the three primary colors?\n\n### Response:\n"
    )
    assert format_prompt(record) == prompt
    response_ids = tokenizer("Red, blue and yellow.", add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id

    enc = encode_example(tokenizer, record, max_length=256)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels) == len(prompt_ids) + len(response_ids) + 1
    supervised = [lab for lab in labels if lab != IGNORE_INDEX]
    assert len(supervised) == len(response_ids) + 1           # the response tokens + EOS
    assert supervised == response_ids + [tokenizer.eos_token_id]
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[: len(prompt_ids)], skip_special_tokens=True) == prompt

    # with an input: the other template; a short answer is kept whole and the prompt cut from the left
    with_input = dict(record, input="Answer briefly.")
    assert format_prompt(with_input).endswith("### Input:\nAnswer briefly.\n\n### Response:\n")
    assert format_prompt(with_input).startswith(
        "Below is an instruction that describes a task, paired with an input that provides further context. ")
    full = encode_example(tokenizer, with_input, max_length=10_000)
    cut = encode_example(tokenizer, with_input, max_length=len(full["input_ids"]) - 3)
    assert cut["input_ids"] == full["input_ids"][3:] and cut["labels"] == full["labels"][3:]


def test_collate_pads_right():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def test_training_lowers_loss_and_only_trains_lora(tokenizer, records):
    # initializer_range 0.1: with HF's 0.02 the frozen lm_head is too small for LoRA to move logits far
    model = build_model("tiny-llama-gqa4", vocab_size=len(tokenizer), initializer_range=0.1)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = instruction_nll(model, tokenizer, records, max_length=128)["nll"]

    logged = []
    config = FinetuneConfig(**dict(FAST, epochs=100), max_steps=30, warmup_steps=3)
    peft_model = finetune_lora(model, tokenizer, records, config, log=lambda *a: logged.append(a))
    after = instruction_nll(peft_model, tokenizer, records, max_length=128)["nll"]
    assert after < before - 1.0, (before, after)  # about 6.4 -> 3.6
    assert not peft_model.training

    # one log call per optimizer step; warm-up then linear decay
    assert [s for s, _, _ in logged] == list(range(1, 31))
    lrs = [lr for _, _, lr in logged]
    assert lrs[:3] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2]) and lrs[-1] < lrs[3]
    assert all(loss > 0 for _, loss, _ in logged)

    # base weights untouched (and frozen), LoRA weights trained (B starts at zero)
    for name, p in peft_model.get_base_model().named_parameters():
        if "lora_" in name:
            assert p.requires_grad
            continue
        assert not p.requires_grad
        key = name.replace(".base_layer", "")
        assert torch.equal(p, base_state[key]), name
    modules = lora_modules(peft_model)
    assert len(modules) == 4 * 7
    assert all(m.lora_B["default"].weight.abs().max() > 0 for m in modules.values())


def test_grad_accum_matches_one_big_batch(tokenizer, records):
    """2 micro-batches of 2 per step = batches of 4 (the loss is normalised over the step's tokens)."""
    histories = []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        model = build_model("tiny-llama-gqa4", vocab_size=len(tokenizer))
        logged = []
        config = FinetuneConfig(**dict(FAST, batch_size=batch_size), grad_accum=grad_accum, max_steps=3)
        finetune_lora(model, tokenizer, records, config, log=lambda *a, out=logged: out.append(a))
        histories.append(logged)
    (a, b) = histories
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == [1, 2, 3]
    assert [loss for _, loss, _ in a] == pytest.approx([loss for _, loss, _ in b], abs=1e-5)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft's probe
def test_pruned_model_merge_and_reload(tokenizer, records, tmp_path):
    model = pruned_model(tokenizer)
    base = copy.deepcopy(model)
    ids = torch.randint(0, len(tokenizer), (2, 17), generator=torch.Generator().manual_seed(0))

    peft_model = finetune_lora(model, tokenizer, records, FinetuneConfig(**FAST, max_steps=8))
    modules = lora_modules(peft_model)
    # no LoRA where attention was emptied; LoRA of the pruned widths elsewhere
    assert not any(".layers.0.self_attn." in name for name in modules)
    layer0 = peft_model.get_base_model().model.layers[0]
    assert layer0.mlp.gate_proj.lora_B["default"].weight.shape == (48, 8)
    assert layer0.mlp.down_proj.lora_A["default"].weight.shape == (8, 48)
    layer2 = peft_model.get_base_model().model.layers[2]
    assert layer2.self_attn.q_proj.lora_B["default"].weight.shape == (32, 8)
    assert layer2.mlp.down_proj.lora_A["default"].weight.shape == (8, 40)
    assert len(modules) == 3 + 3 * 7  # layer 0: MLP only

    tuned = logits(peft_model, ids)
    assert not torch.allclose(tuned, logits(base, ids), atol=1e-4)  # the adapter does something

    # the adapter alone reloads onto the untouched pruned base
    adapter_dir = save_adapter(peft_model, tmp_path / "adapter")
    assert (adapter_dir / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter.tmp").exists()
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    assert torch.allclose(logits(reloaded, ids), tuned, atol=1e-5)

    merged = merge_adapter(peft_model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert torch.allclose(logits(merged, ids), tuned, atol=1e-5)

    out = save_pruned(merged, tokenizer, tmp_path / "merged")
    loaded = load_model(out).eval()
    assert torch.allclose(logits(loaded, ids), tuned, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_training(tokenizer, records):
    histories = []
    for checkpointing in (False, True):
        model = pruned_model(tokenizer)
        logged = []
        config = FinetuneConfig(**FAST, max_steps=3, gradient_checkpointing=checkpointing)
        peft_model = finetune_lora(model, tokenizer, records, config,
                                   log=lambda *a, out=logged: out.append(a))
        histories.append([loss for _, loss, _ in logged])
        assert not peft_model.get_base_model().is_activation_checkpointing  # switched off again
    assert histories[0] == pytest.approx(histories[1], abs=1e-5)


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [
    ("r", 0), ("r", True), ("alpha", 0), ("dropout", 1.0), ("dropout", -0.1), ("lr", 0.0),
    ("lr", float("nan")), ("epochs", 0), ("max_steps", 0), ("batch_size", 0), ("grad_accum", 0),
    ("max_length", 1), ("n_records", 0), ("seed", -1), ("gradient_checkpointing", "yes"),
    ("target_modules", ()), ("target_modules", ("q_proj", "")), ("warmup_steps", -1), ("warmup_steps", 1.5),
])
def test_bad_config_names_the_key(key, value):
    config = dataclasses.replace(FinetuneConfig(), **{key: value})
    with pytest.raises(ValueError, match=rf"finetune\.{key}\b"):
        config.validate()


def test_defaults_are_valid_and_finetune_validates(tokenizer, records):
    FinetuneConfig().validate()
    model = build_model("tiny-llama-gqa4", vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match=r"finetune\.batch_size"):
        finetune_lora(model, tokenizer, records, FinetuneConfig(batch_size=0))
    with pytest.raises(ValueError, match=r"finetune\.target_modules"):
        finetune_lora(model, tokenizer, records, FinetuneConfig(target_modules=("nope_proj",)))
    with pytest.raises(ValueError, match=r"finetune\.max_length"):
        finetune_lora(model, tokenizer, records, FinetuneConfig(max_length=1))  # no room for an answer token
