"""Layer and block importance (ShortGPT's block influence): 1 - cos(input, output), forward passes only.

For decoder layer l with residual input x, attention output a and MLP output m::

    layer importance = mean_t [1 - cos(x_t,      x_t + a_t + m_t)]
    attn  importance = mean_t [1 - cos(x_t,      x_t + a_t)]
    mlp   importance = mean_t [1 - cos(x_t + a_t, x_t + a_t + m_t)]

averaged over all calibration tokens t, computed in float32. A block or layer that barely turns
the residual stream scores near 0 and is a good candidate for removal.
"""

from __future__ import annotations

from contextlib import ExitStack

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from gqaprune.errors import NonFiniteError
from gqaprune.models.adapters import get_adapter
from gqaprune.models.modules import check_finite_weights, decoder_and_head, watch_activations
from gqaprune.pruning.importance import check_calibration
from gqaprune.runtime.distributed import DistContext, single_process
from gqaprune.runtime.placement import is_sharded, no_grad_mode

COLUMNS = ("layer", "layer_importance", "attn_importance", "mlp_importance")


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of 1 - cos(a_t, b_t); a, b: [..., hidden] float32 -> scalar."""
    return (1.0 - nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)).sum()


def block_similarity(model: nn.Module, samples: torch.Tensor, batch_size: int = 8,
                     progress: bool = True, ctx: DistContext | None = None) -> pd.DataFrame:
    """Per-layer importance table (columns: ``COLUMNS``) from forward passes over ``samples`` [n, seq].

    ``ctx`` (default: one process): on N ranks the batches are split over the ranks (replicated or
    FSDP2-sharded model), the sums of 1 - cos and the token counts added up; every rank returns the
    same table.
    """
    check_calibration(samples)
    check_finite_weights(model)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    ctx = ctx or single_process()
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    n = len(layers)
    device = next(model.parameters()).device
    # [layer, (layer, attn, mlp)] sums of 1 - cos, kept on the device so no per-layer sync is needed
    sums = torch.zeros(n, 3, dtype=torch.float64, device=device)
    captured: dict[str, torch.Tensor] = {}
    counting = [True]  # False for a lock-step repeat (a sharded model): run, not counted

    def layer_in(i):
        def fn(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            captured[f"x{i}"] = x.detach().float()
        return fn

    def attn_out(i):
        def fn(module, args, kwargs, output):
            captured[f"a{i}"] = output[0].detach().float()
        return fn

    def layer_out(i):
        def fn(module, args, kwargs, output):
            out = (output[0] if isinstance(output, tuple) else output).detach().float()
            x, a = captured.pop(f"x{i}"), captured.pop(f"a{i}")
            if not counting[0]:
                return
            mid = x + a
            sums[i, 0] += _one_minus_cos(x, out)
            sums[i, 1] += _one_minus_cos(x, mid)
            sums[i, 2] += _one_minus_cos(mid, out)
        return fn

    tokens = 0
    checks: list = []
    with ExitStack() as stack, no_grad_mode(ctx):
        stack.enter_context(watch_activations(model, checks))
        for i, layer in enumerate(layers):
            for handle in (
                layer.register_forward_pre_hook(layer_in(i), with_kwargs=True),
                adapter.attention(layer).register_forward_hook(attn_out(i), with_kwargs=True),
                layer.register_forward_hook(layer_out(i), with_kwargs=True),
            ):
                stack.callback(handle.remove)
        sharded = is_sharded(model)
        # the decoder alone: the LM head's logits ([batch, T, vocab]) are not needed here; an FSDP2 root must
        # run whole (its forward gathers the embeddings)
        run = model if sharded else decoder_and_head(model, strict=True)[0]
        batches = ctx.batches(samples.shape[0], batch_size, lockstep=sharded)
        for rows, active in tqdm(batches, desc="similarity", disable=not (progress and ctx.is_main)):
            ids = samples[rows].to(device)
            counting[0] = active
            run(input_ids=ids, use_cache=False)
            tokens += ids.numel() if active else 0
            flags = torch.stack([flag for flag, _ in checks])
            if not bool(flags.all()):
                raise NonFiniteError(checks[int((~flags).nonzero()[0, 0])][1])
            checks.clear()
    if ctx.is_distributed:
        count = torch.tensor([float(tokens)], dtype=torch.float64, device=sums.device)
        ctx.all_reduce_([sums, count])
        tokens = int(count.item())
    means = (sums / tokens).cpu().numpy()
    return pd.DataFrame({
        "layer": range(n),
        "layer_importance": means[:, 0],
        "attn_importance": means[:, 1],
        "mlp_importance": means[:, 2],
    })
