"""Recovery by distillation: train the pruned model to reproduce the dense model's next-token distributions.

Instead of instruction LoRA (labels from a small instruction set, a distribution far from the text
the model is judged on), the pruned student learns from the dense teacher on plain text windows
(Minitron): for every position, the loss is

    KL(p_teacher || p_student) = sum_v p_t(v) (log p_t(v) - log p_s(v)),    p = softmax(logits / temperature)

averaged over tokens (times ``temperature**2``, as usual), plus optionally ``hidden_weight`` times
the mean squared error of the final (normed) hidden states. The teacher runs under
``torch.inference_mode``; the student's logits are formed ``head_chunk`` rows at a time so the
``[batch, seq_len, vocab]`` float32 logits and their gradient never exist at once.

Trainable parameters (``mode``):

* ``full``: every decoder-layer parameter (projections and norms); embeddings and the LM head stay
  frozen (``train_embeddings``), which also keeps tied embeddings tied.
* ``lora``: LoRA adapters (peft) on the projections, as :mod:`gqaprune.recovery.lora` does.

Budget: ``max_steps`` and/or ``max_seconds`` (wall time, checked after every step). The learning rate
warms up linearly over ``warmup_steps`` and then decays linearly to ``min_lr_ratio * lr`` at the
planned last step; with only a time budget the planned number of steps is re-estimated from the
mean step time after every step, so the decay ends when the time does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gqaprune.models.modules import decoder_and_head

__all__ = ["DistillConfig", "distill", "distillation_loss"]

MODES = ("full", "lora")


@dataclass(frozen=True)
class DistillConfig:
    """Distillation recovery settings (a ``finetune`` option; see the module docstring)."""

    mode: str = "full"
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 8
    max_steps: int | None = None
    max_seconds: float | None = 600.0
    warmup_steps: int = 10
    temperature: float = 1.0
    hidden_weight: float = 0.0
    train_embeddings: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    head_chunk: int = 256
    grad_clip: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad key."""
        if self.mode not in MODES:
            raise ValueError(f"distill.mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.max_steps is None and self.max_seconds is None:
            raise ValueError("distill needs max_steps or max_seconds")
        if not (self.lr > 0 and self.batch_size >= 1 and self.temperature > 0 and self.hidden_weight >= 0):
            raise ValueError("distill: lr, batch_size, temperature must be > 0 and hidden_weight >= 0")


def distill_settings(finetune) -> DistillConfig:
    """The distillation settings of a ``finetune`` params section
    (:class:`gqaprune.config.recovery_and_evaluation.FinetuneParams`: ``distill_*``, ``max_steps``, ``seed``)."""
    return DistillConfig(mode=finetune.distill_mode, lr=finetune.distill_lr, batch_size=finetune.distill_batch_size,
                         max_steps=finetune.max_steps, max_seconds=finetune.distill_max_seconds, seed=finetune.seed)


def distillation_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: nn.Module,
                      teacher_head: nn.Module, temperature: float = 1.0, hidden_weight: float = 0.0,
                      head_chunk: int = 256) -> torch.Tensor:
    """Mean over rows of T^2 KL(teacher || student) (+ hidden_weight * MSE of the hidden states).

    ``student_hidden`` / ``teacher_hidden``: final hidden states ``[rows, H]`` (teacher detached).
    The backward of each row chunk runs inside autograd's graph; chunks only bound the float32 logits.
    """
    rows = student_hidden.shape[0]
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for r in range(0, rows, head_chunk):
        s = student_head(student_hidden[r:r + head_chunk]).float() / temperature
        with torch.no_grad():
            t = F.log_softmax(teacher_head(teacher_hidden[r:r + head_chunk]).float() / temperature, dim=-1)
        total = total + F.kl_div(F.log_softmax(s, dim=-1), t, log_target=True, reduction="sum")
    loss = total * temperature ** 2 / rows
    if hidden_weight:
        loss = loss + hidden_weight * F.mse_loss(student_hidden.float(), teacher_hidden.float())
    return loss


def _trainable(student: nn.Module, config: DistillConfig) -> tuple[nn.Module, list[nn.Parameter]]:
    """(the module to train, its trainable parameters) for ``config.mode``."""
    if config.mode == "lora":
        from peft import LoraConfig, get_peft_model

        from gqaprune.config.choices import DEFAULT_TARGET_MODULES

        present = {n.rsplit(".", 1)[-1] for n, m in student.named_modules() if isinstance(m, nn.Linear)}
        targets = [t for t in DEFAULT_TARGET_MODULES if t in present]
        model = get_peft_model(student, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                                   target_modules=targets, bias="none"))
        return model, [p for p in model.parameters() if p.requires_grad]
    decoder, head = decoder_and_head(student, strict=True)
    frozen = {id(p) for p in head.parameters()} | {id(p) for p in decoder.embed_tokens.parameters()}
    params = []
    for p in student.parameters():
        train = config.train_embeddings or id(p) not in frozen
        p.requires_grad_(train)
        if train:
            params.append(p)
    return student, params


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, config: DistillConfig = DistillConfig(),
            log: Callable[[int, float, float, float], None] | None = None) -> nn.Module:
    """Train ``student`` towards ``teacher`` on token ``windows`` ``[n, T]``; returns the trained student.

    Windows are visited in a seeded random order (a new permutation each pass). With ``mode="lora"``
    the adapters are merged back before returning, so the result is a plain model either way. ``log``
    gets ``(step, loss, lr, elapsed_s)`` after every optimizer step.
    """
    config.validate()
    torch.manual_seed(config.seed)
    teacher.eval()
    model, params = _trainable(student, config)
    s_decoder, s_head = decoder_and_head(model, strict=True)
    t_decoder, t_head = decoder_and_head(teacher, strict=True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(config.seed)
    device = next(student.parameters()).device
    order: list[int] = []
    planned = config.max_steps or 10 ** 9
    start = time.perf_counter()
    model.train()
    step = 0
    try:
        while True:
            if config.max_steps is not None and step >= config.max_steps:
                break
            elapsed = time.perf_counter() - start
            if config.max_seconds is not None:
                if elapsed >= config.max_seconds:
                    break
                if step:  # re-plan the schedule from the mean step time so far
                    by_time = int(config.max_seconds / (elapsed / step))
                    planned = min(config.max_steps or by_time, by_time)
            if len(order) < config.batch_size:
                order += torch.randperm(windows.shape[0], generator=gen).tolist()
            idx, order = order[:config.batch_size], order[config.batch_size:]
            ids = windows[idx].to(device)
            if step < config.warmup_steps:
                factor = (step + 1) / config.warmup_steps
            else:
                span = max(1, planned - config.warmup_steps)
                progress = min(1.0, (step - config.warmup_steps) / span)
                factor = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
            lr = config.lr * factor
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.inference_mode():
                th = t_decoder(input_ids=ids, use_cache=False).last_hidden_state
            th = th.clone()  # leave inference mode: a normal tensor for the loss
            sh = s_decoder(input_ids=ids, use_cache=False).last_hidden_state
            h = sh.shape[-1]
            loss = distillation_loss(sh.reshape(-1, h), th.reshape(-1, h), s_head, t_head, config.temperature,
                                     config.hidden_weight, config.head_chunk)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            step += 1
            if log is not None:
                log(step, float(loss.detach()), lr, time.perf_counter() - start)
    finally:
        model.eval()
        for p in student.parameters():
            p.requires_grad_(False)
    if config.mode == "lora":
        student = model.merge_and_unload(safe_merge=True)
    return student.eval()
