"""Small torch helpers shared by scoring, fine-tuning and the benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool = True, frozen_inputs: bool = False) -> Iterator[None]:
    """Recompute decoder-layer activations in the backward pass for the duration of the block.

    Non-reentrant checkpointing, in training mode (transformers only checkpoints then; these models
    have no dropout by default), the model's mode restored afterwards. ``frozen_inputs``: the
    embeddings are frozen (LoRA), so their output gets a hook that makes it require grad, which
    gradients into checkpointed layers need. transformers >= 5.2x renamed ``gradient_checkpointing_*``
    to ``activation_checkpointing_*`` (the GPU image has 5.17): both are accepted.
    """
    if not enabled:
        yield
        return
    was_training = model.training
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hooked = frozen_inputs and not getattr(model, "_require_grads_hooks", None)
    if hooked:
        model.enable_input_require_grads()
    model.train()
    try:
        yield
    finally:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        if hooked:
            model.disable_input_require_grads()
        model.train(was_training)


@contextmanager
def watch_activations(model: nn.Module, checks: list) -> Iterator[None]:
    """Record, per decoder layer and per forward, whether the layer's output is finite.

    Each forward hook appends ``(device bool flag, message)`` to ``checks`` without a host sync; the
    caller reads the flags once per batch and names the first layer whose output is NaN / infinite
    (with finite weights, that is where non-finite values first appear).
    """
    from gqaprune.models.adapters import get_adapter

    layers = get_adapter(model.config).layers(model)

    def hook(index: int):
        def fn(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            checks.append((torch.isfinite(out.detach()).all(),
                           f"non-finite activations at the output of decoder layer {index}: the weights or the "
                           "calibration data overflow in this dtype; use float32 or check the model"))
        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: every element of ``t`` is finite (no host sync on an accelerator).

    On a CPU ``torch.isfinite(t).all()`` is ~50x slower than a float32 sum, which is non-finite
    whenever an element is NaN or infinite; the exact test runs only when the sum is not finite.
    """
    if t.device.type != "cpu":
        return torch.isfinite(t).all()
    total = t.sum(dtype=torch.float32)
    return torch.isfinite(total) if bool(torch.isfinite(total)) else torch.isfinite(t).all()


def check_finite_weights(model: nn.Module) -> None:
    """Raise NonFiniteError naming the first parameter (and so its layer) holding NaN or infinity."""
    from gqaprune.errors import NonFiniteError

    names, flags = [], []
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor shard (FSDP2) checks its own rows
        names.append(name)
        flags.append(all_finite(local.detach()))
    flags = torch.stack([f.to(flags[0].device) for f in flags])  # one host sync for all of them
    if not bool(flags.all()):
        name = names[int((~flags).nonzero()[0, 0])]
        raise NonFiniteError(f"non-finite weight {name}{layer_of(name)}: it holds NaN or infinity; the model is "
                             "corrupt: re-create or re-download it")


def layer_of(name: str) -> str:
    """`` (decoder layer N)`` for a parameter name inside a decoder layer, else ``""``."""
    parts = name.split(".")
    for before, part in zip(parts, parts[1:], strict=False):
        if before == "layers" and part.isdigit():
            return f" (decoder layer {part})"
    return ""


def decoder_and_head(model, strict: bool = False):
    """(decoder returning last_hidden_state, lm_head) of a HF causal LM, peft-wrapped or not.

    None where the logits are not ``lm_head(final hidden states)`` (no such split, or soft-capped logits);
    with ``strict`` that raises ValueError instead. A peft wrapper injects LoRA into the decoder's own
    modules, so the base decoder still applies it.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    decoder = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    if decoder is None or head is None or getattr(config, "final_logit_softcapping", None):
        if strict:
            raise ValueError(f"{type(base).__name__}: its logits are not lm_head(final hidden states)")
        return None
    return decoder, head
