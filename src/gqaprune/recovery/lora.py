"""LoRA recovery fine-tuning of a (pruned) causal LM on instruction records, as the model is used.

Records are rendered as the model sees them (:mod:`gqaprune.data.instructions`): through the
tokenizer's chat template when it has one (one user turn, then the assistant's answer with its
end-of-turn marker), else in the Stanford Alpaca format with the EOS token after the answer.
``labels`` are ``input_ids`` with every prompt position set to ``-100``, so the loss covers only the
answer tokens and its end marker (labels are aligned with ``input_ids``; the shift happens in the
loss). Examples are cut to ``max_length`` tokens by :func:`gqaprune.data.instructions.encode_record`
(the prompt from the left, the answer from the right); one with no answer token left is dropped (with
a warning). Batches are padded on the right to their longest example with ``attention_mask`` 0 and
labels ``-100`` on the padding. The held-out records that the evaluate stages score are never given
to this module (:func:`gqaprune.data.instructions.split_records`).

Training: plain torch loop, AdamW on the LoRA parameters only (weight decay 0), learning rate
linearly warmed up over ``warmup_steps`` optimizer steps and then decayed linearly towards 0 at the
last step, batches drawn from a seeded permutation of the examples each epoch. The loss of an
optimizer step is the mean cross-entropy over all supervised tokens of its ``grad_accum``
micro-batches (so accumulation does not change the objective).

Several processes (``ctx`` of :func:`finetune_lora`): each micro-batch's examples are split over the
ranks (DDP over replicas, or an FSDP2-sharded base with replicated LoRA matrices); the objective and
the updates are those of one process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gqaprune.config.choices import DEFAULT_TARGET_MODULES
from gqaprune.config.recovery_and_evaluation import FinetuneConfig
from gqaprune.data.instructions import encode_record
from gqaprune.models.modules import activation_checkpointing
from gqaprune.runtime.distributed import DistContext, single_process
from gqaprune.runtime.files import atomic_dir, write_json
from gqaprune.runtime.placement import is_sharded

log_ = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "IGNORE_INDEX",
    "FinetuneConfig",
    "collate",
    "encode_example",
    "encode_records",
    "finetune_lora",
    "merge_adapter",
    "save_adapter",
]

IGNORE_INDEX = -100  # label value ignored by the loss (prompt and padding positions)

# ----------------------------------------------------------------------------------------------
# Data: encoding, batching
# ----------------------------------------------------------------------------------------------


def encode_example(tokenizer, record: Mapping[str, str], max_length: int) -> dict[str, list[int]]:
    """One record as ``{"input_ids", "labels"}`` (lists of equal length <= ``max_length``), the prompt positions
    of ``labels`` set to :data:`IGNORE_INDEX` (rendering and cut: :func:`gqaprune.data.instructions.encode_record`)."""
    ids, n_prompt, _ = encode_record(tokenizer, record, max_length)
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]}


def encode_records(tokenizer, records: Sequence[Mapping[str, str]],
                   max_length: int) -> list[dict[str, list[int]]]:
    """Encode records with :func:`encode_example`, dropping (and warning about) those with no response left.

    A label at position 0 is never predicted (nothing precedes it), so an example needs a supervised
    label at position >= 1 to contribute to the loss.
    """
    examples = [encode_example(tokenizer, r, max_length) for r in records]
    kept = [e for e in examples if any(lab != IGNORE_INDEX for lab in e["labels"][1:])]
    if len(kept) < len(examples):
        log_.warning("%d of %d instruction records have no response token within max_length=%d; dropped",
                     len(examples) - len(kept), len(examples), max_length)
    return kept


def collate(examples: Sequence[Mapping[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples to the longest one.

    Returns ``input_ids`` [B, T] (padding ``pad_id``), ``attention_mask`` [B, T] (1 real, 0 padding)
    and ``labels`` [B, T] (padding :data:`IGNORE_INDEX`), all int64.
    """
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        t = len(e["input_ids"])
        input_ids[i, :t] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        attention_mask[i, :t] = 1
        labels[i, :t] = torch.as_tensor(e["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pad_id(tokenizer) -> int:
    """Padding id: the tokenizer's pad token, else EOS (padding is masked everywhere anyway)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad batches with")
    return int(tokenizer.eos_token_id)


def _summed_loss(model: nn.Module, batch: Mapping[str, torch.Tensor],
                 device: torch.device) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over the supervised tokens of a batch, and their count."""
    input_ids = batch["input_ids"].to(device)            # [B, T]
    attention_mask = batch["attention_mask"].to(device)  # [B, T]
    labels = batch["labels"].to(device)                  # [B, T]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [B, T, V]
    targets = labels[:, 1:]                               # token t+1 is predicted at position t
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),  # [B*(T-1), V]
        targets.reshape(-1),                                    # [B*(T-1)]
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((targets != IGNORE_INDEX).sum())


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _micro_batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless stream of example-index batches: a new seeded permutation per epoch, last one may be short."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak lr at 0-based optimizer step ``step``: linear warm-up, then linear decay.

    Warm-up reaches the full lr at step ``warmup - 1``; decay gives ``(total - step) / (total - warmup)``,
    so the last step still has a non-zero lr.
    """
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _existing_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The target names that match (as peft does: exact name or ``.name`` suffix) at least one Linear."""
    found = []
    for t in targets:
        if any(isinstance(m, nn.Linear) and (name == t or name.endswith("." + t))
               for name, m in model.named_modules()):
            found.append(t)
    return found


def _step_plan(micro: Sequence[Sequence[int]], ctx: DistContext) -> list[tuple[list[int], bool]]:
    """This rank's micro-batches of an optimizer step: its contiguous share of each of the step's micro-batches.

    Every rank runs as many micro-batches as the step has (DDP syncs on the last backward, FSDP gathers
    each layer on every rank's forward); a share left empty (fewer examples than ranks) runs the
    micro-batch's first example as an inactive repeat, with zero loss weight. One process: the step's
    micro-batches themselves.
    """
    plan = []
    for ids in micro:
        share = [ids[i] for i in ctx.shard(len(ids))]
        plan.append((share, True) if share else ([ids[0]], False))
    return plan


def finetune_lora(model: nn.Module, tokenizer, records: Sequence[Mapping[str, str]], config: FinetuneConfig,
                  log: Callable[[int, float, float], None] | None = None, ctx: DistContext | None = None,
                  text_windows: torch.Tensor | None = None):
    """LoRA-tune ``model`` on instruction ``records`` (and plain ``text_windows`` ``[n, T]``, every token
    supervised: the text part of a recovery mix); returns the peft model, in eval mode.

    ``model`` is wrapped in place by peft's ``get_peft_model`` (task ``CAUSAL_LM``): LoRA layers are
    injected into every Linear whose name ends in one of ``config.target_modules``; a pruned layer
    whose attention or MLP was emptied simply has no such Linear there, and narrower projections
    get LoRA matrices of their own width. Base weights stay frozen; only LoRA parameters train.

    ``log(step, loss, lr)`` is called after every optimizer step with the 1-based step number, that
    step's mean token loss and the learning rate it used. A tqdm bar shows progress. The global
    torch RNG is seeded with ``config.seed`` (LoRA initialisation, dropout).

    ``ctx`` (default: one process): on N ranks every rank calls this with its replica (wrapped in
    ``DistributedDataParallel``) or FSDP2 shard of the model (the frozen base stays sharded, the LoRA
    matrices are replicated and their gradients added up by hand); each micro-batch's examples are
    split over the ranks and the loss is still normalised by the supervised tokens of the whole step,
    so every rank applies the same update and ``log`` gets the same loss as one process (with
    ``dropout`` 0: each rank draws its own dropout masks).

    Raises:
        ValueError: bad config (``finetune.<key>``), no usable record, no EOS token, or no target module
            present in the model.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    config.validate()
    ctx = ctx or single_process()
    records = list(records)[: config.n_records] if config.n_records is not None else list(records)
    examples = encode_records(tokenizer, records, config.max_length)
    for row in (text_windows.tolist() if text_windows is not None else []):
        examples.append({"input_ids": row[: config.max_length], "labels": row[: config.max_length]})
    if not examples:
        raise ValueError("no instruction record to train on (none given, or none has a response token "
                         "within finetune.max_length)")
    targets = _existing_targets(model, config.target_modules)
    if not targets:
        raise ValueError(f"finetune.target_modules {list(config.target_modules)} match no Linear layer "
                         "of the model")
    missing = sorted(set(config.target_modules) - set(targets))
    if missing:
        log_.warning("finetune.target_modules %s are not in the model; LoRA goes to %s", missing, targets)

    sharded = is_sharded(model)
    torch.manual_seed(config.seed)  # the same LoRA initialisation on every rank
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=config.r, lora_alpha=config.alpha,
                      lora_dropout=config.dropout, target_modules=list(targets), bias="none")
    with warnings.catch_warnings():  # peft probes the deprecated `is_gradient_checkpointing` property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    base = peft_model.get_base_model()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    runner, scale = peft_model, 1.0
    if ctx.is_distributed and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.device.index] if torch.device(ctx.device).type == "cuda" else None
        runner = DistributedDataParallel(peft_model, device_ids=device_ids)
        scale = float(ctx.world_size)  # DDP averages the ranks' gradients; a step needs their sum
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    batches_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_micro = max(1, math.ceil(config.epochs * batches_per_epoch))
    total_steps = math.ceil(total_micro / config.grad_accum)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
        total_micro = min(total_micro, total_steps * config.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.warmup_steps, total_steps))

    device, pad = _model_device(peft_model), _pad_id(tokenizer)
    stream = _micro_batches(len(examples), config.batch_size, config.seed)
    supervised = [sum(1 for lab in e["labels"][1:] if lab != IGNORE_INDEX) for e in examples]
    peft_model.train()
    done_micro = 0
    try:
        with activation_checkpointing(base, config.gradient_checkpointing, frozen_inputs=True), \
                tqdm(total=total_steps, desc="finetune (LoRA)", unit="step", disable=not ctx.is_main) as bar:
            for step in range(total_steps):
                n_micro = min(config.grad_accum, total_micro - done_micro)
                micro = [next(stream) for _ in range(n_micro)]
                done_micro += n_micro
                # normalise by the supervised tokens of the whole step, so accumulation = one big batch
                n_tokens = sum(supervised[i] for ids in micro for i in ids)
                plan = _step_plan(micro, ctx)
                step_loss = 0.0
                for n, (ids, active) in enumerate(plan):
                    last = n == len(plan) - 1
                    with contextlib.nullcontext() if runner is peft_model or last else runner.no_sync():
                        loss, _ = _summed_loss(runner, collate([examples[i] for i in ids], pad), device)
                        (loss * scale / n_tokens if active else loss * 0.0).backward()
                    step_loss += float(loss.detach()) if active else 0.0
                if ctx.is_distributed:
                    if sharded:  # LoRA matrices are plain replicated tensors: add their gradients up
                        ctx.all_reduce_([p.grad if p.grad is not None else _zero_grad(p) for p in params])
                    total = torch.tensor([step_loss], dtype=torch.float64)
                    ctx.all_reduce_(total)
                    step_loss = float(total.item())
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_loss /= n_tokens
                if log is not None:
                    log(step + 1, step_loss, lr)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
    finally:
        peft_model.eval()
    return peft_model


def _zero_grad(p: nn.Parameter) -> torch.Tensor:
    """Give ``p`` a zero gradient (a LoRA matrix no example reached on this rank) so the reductions line up."""
    p.grad = torch.zeros_like(p)
    return p.grad


# ----------------------------------------------------------------------------------------------
# Saving and merging
# ----------------------------------------------------------------------------------------------


def save_adapter(peft_model, out_dir: str | Path, ctx: DistContext | None = None) -> Path:
    """Save only the LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) to ``out_dir``.

    ``ctx``: on N ranks the adapters are replicated; the main rank writes them, the others write nothing.

    Written to a temporary sibling folder and renamed into place, replacing an existing ``out_dir``.
    peft keeps ``target_modules`` as a set, so its JSON order varies from run to run; the config is
    rewritten with sorted lists and keys, so equal adapters give equal bytes.
    """
    if not (ctx or single_process()).is_main:
        return Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        peft_model.save_pretrained(tmp)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        for key, value in config.items():
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                config[key] = sorted(value)
        config_path.unlink()
        write_json(config_path, config, sort_keys=True)
    return Path(out_dir)


def merge_adapter(peft_model) -> nn.Module:
    """Fold the LoRA update into the base weights and return the plain base model, in eval mode.

    Uses peft's ``merge_and_unload(safe_merge=True)`` (refuses NaN/inf results). The peft wrapper
    must not be used afterwards; the result can be saved with :func:`gqaprune.pruning.surgery.save_pruned`.
    """
    return peft_model.merge_and_unload(safe_merge=True).eval()
