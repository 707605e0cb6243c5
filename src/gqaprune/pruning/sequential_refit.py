"""Sequential compensation: prune and refit layer by layer, on the inputs of the already-pruned prefix.

One-shot compensation (:mod:`gqaprune.pruning.compensation`) refits every ``o_proj`` / ``down_proj`` from the
*dense* model's activations, so each block is fitted for inputs it will never see once the layers
before it are pruned too. Here (as SparseGPT / SlimGPT do for their layer-wise solvers) the
calibration hidden states are pushed through the model one decoder layer at a time, twice: through
the dense layer and through its pruned copy. For layer ``l``:

1. the attention block is sliced to its kept groups; its ``o_proj`` is refitted on the kept inputs
   ``x'`` that the *pruned prefix* produces, towards the dense block's output ``y`` on the *dense*
   prefix's inputs (``target="dense"``: the refit also corrects the error the prefix already made),
   or towards ``x'_full W^T``, the dense weights on the pruned prefix's inputs (``target="self"``:
   SparseGPT's objective)::

       W'^T = (X'^T X' + lam I)^-1 (X'^T Y + lam W_K^T),  lam = (ridge + |K| / tokens) * mean diag(X'^T X')

   (the same ridge rule as the one-shot refit, pulling towards the original weights);
2. with the refitted attention in place the MLP is sliced and ``down_proj`` refitted the same way;
3. both streams advance through layer ``l`` (the pruned stream through the pruned layer).

Decoder layers are called directly with the keyword arguments (rotary embeddings, mask, positions)
that the model passes to layer 0, caught once per batch with a forward pre-hook, so any family whose
layers share that calling convention works (LLaMA, Qwen2 with q/k/v biases, Mistral). An emptied block
has nothing to refit; a layer that loses both blocks is removed at the end by
:func:`gqaprune.pruning.surgery.prune_model`, as in one-shot surgery.

Cost: per layer, two dense-layer and two pruned-layer passes over the calibration samples (about
2-3 model forwards in all) plus one ``[|K|, |K|]`` solve per refitted block; memory: the dense and the
pruned hidden streams ``[n_samples, seq_len, hidden]`` (float32) and one Gram matrix at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from gqaprune.models.adapters import get_adapter
from gqaprune.models.hf_code.modeling_gqaprune import EmptyAttention, EmptyMLP
from gqaprune.models.units import LayerKeep
from gqaprune.pruning.surgery import SurgeryReport, prune_attention, prune_mlp, prune_model

TARGETS = ("dense", "self")

__all__ = ["TARGETS", "layer_inputs", "sequential_prune"]


class _Stop(Exception):
    """Raised by the layer-0 hook once its inputs are caught."""


def layer_inputs(model: nn.Module, samples: torch.Tensor, batch_size: int
                 ) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Layer-0 hidden states per calibration batch, and the keyword arguments of every layer per batch.

    Returns ``(hidden, kwargs)``: ``hidden[b]`` is ``[batch, T, H]``; ``kwargs[l][b]`` what the model
    passes to layer ``l`` (rotary embeddings, mask, positions). When all layers share one attention type
    the model only runs up to layer 0 (a pre-hook stops it) and every layer reuses layer 0's arguments;
    a model mixing types (``config.layer_types``: sliding and full attention) runs through all layers.
    """
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    types = getattr(model.config, "layer_types", None)
    per_layer = bool(types) and len(set(types)) > 1
    device = next(model.parameters()).device
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def make(i: int):
        def hook(module, args, kw):
            kw = dict(kw)
            h = args[0] if args else kw.pop("hidden_states")
            kwargs[i].append(kw)
            if i == 0:
                hidden.append(h.detach())
            if i == (len(layers) - 1 if per_layer else 0):
                raise _Stop
        return hook

    handles = [layer.register_forward_pre_hook(make(i), with_kwargs=True)
               for i, layer in enumerate(layers) if per_layer or i == 0]
    try:
        with torch.inference_mode():
            for start in range(0, samples.shape[0], batch_size):
                try:
                    model(input_ids=samples[start:start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    if not per_layer:
        kwargs = [kwargs[0]] * len(layers)
    return hidden, kwargs


def _out(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _Capture:
    """Forward pre-hook / hook pair that keeps one module's input or output of the latest call."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def pre(self, module, args):
        self.value = args[0].detach()

    def post(self, module, args, output):
        self.value = _out(output).detach()


def _solve(gram: torch.Tensor, cross: torch.Tensor, w_k: torch.Tensor, tokens: int, ridge: float) -> torch.Tensor:
    """Ridge least squares pulled towards ``w_k`` [out, |K|]: returns W' [out, |K|] (float64)."""
    k = gram.shape[0]
    lam = (ridge + k / max(tokens, 1)) * gram.diagonal().mean().clamp_min(1e-12)
    rhs = cross + lam * w_k.T  # [|K|, out]
    return torch.linalg.solve(gram + lam * torch.eye(k, dtype=gram.dtype, device=gram.device), rhs).T


def _new_linear(like: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    """A Linear with ``weight`` [out, in] and ``like``'s bias, dtype and device."""
    new = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=like.bias is not None,
                                   device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if like.bias is not None:
            new.bias.copy_(like.bias)
    return new


def _refit_dense(dense_layer: nn.Module, pruned_layer: nn.Module, proj_of, stream_d, stream_p, kwargs,
                 ridge: float) -> nn.Linear:
    """Refit the pruned layer's sliced output projection towards the dense projection's outputs.

    Inputs: the pruned layer on the pruned stream (kept columns only); targets: the dense layer on the
    dense stream, minus the projection's own bias (kept as it is).
    """
    proj_d, proj_p = proj_of(dense_layer), proj_of(pruned_layer)
    cap_y, cap_x = _Capture(), _Capture()
    handles = [proj_p.register_forward_pre_hook(cap_x.pre), proj_d.register_forward_hook(cap_y.post)]
    gram = cross = None
    tokens = 0
    bias = proj_p.bias.detach().double() if proj_p.bias is not None else None
    try:
        with torch.inference_mode():
            for hd, hp, kw in zip(stream_d, stream_p, kwargs, strict=True):
                pruned_layer(hp, **kw)
                dense_layer(hd, **kw)
                x = cap_x.value.reshape(-1, cap_x.value.shape[-1]).double()  # [tokens, |K|]
                y = cap_y.value.reshape(-1, cap_y.value.shape[-1]).double()  # [tokens, out]
                if bias is not None:
                    y = y - bias
                g, c = x.T @ x, x.T @ y
                gram = g if gram is None else gram + g
                cross = c if cross is None else cross + c
                tokens += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    return _new_linear(proj_p, _solve(gram, cross, proj_p.weight.detach().double(), tokens, ridge))


def _refit_self(dense_block: nn.Module, pruned_layer: nn.Module, pruned_block: nn.Module, proj_of,
                kept_cols: torch.Tensor, stream_p, kwargs, ridge: float) -> nn.Linear:
    """SparseGPT's objective: refit the kept columns so x'_K W'^T matches x' W^T.

    x' is the dense block's projection input when the dense block is fed what the pruned block receives
    (the pruned stream, through the pruned layer up to that block).
    """
    proj_d, proj_p = proj_of(dense_block), proj_of(pruned_block)
    cap = _Capture()
    calls: list[tuple[tuple, dict]] = []

    def grab(module, args, kw):
        calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kw)))

    handles = [proj_d.register_forward_pre_hook(cap.pre),
               pruned_block.register_forward_pre_hook(grab, with_kwargs=True)]
    gram, tokens = None, 0
    try:
        with torch.inference_mode():
            for hp, kw in zip(stream_p, kwargs, strict=True):
                calls.clear()
                pruned_layer(hp, **kw)
                args, bkw = calls[-1]
                dense_block(*args, **bkw)  # the dense block on the pruned block's input: full-width x'
                x = cap.value.reshape(-1, cap.value.shape[-1]).double()
                g = x.T @ x
                gram = g if gram is None else gram + g
                tokens += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    w = proj_d.weight.detach().double()
    g_kk = gram[kept_cols][:, kept_cols]
    cross = gram[kept_cols] @ w.T
    return _new_linear(proj_p, _solve(g_kk, cross, w[:, kept_cols], tokens, ridge))


@torch.no_grad()
def sequential_prune(dense: nn.Module, keep: Mapping[int, LayerKeep], samples: torch.Tensor, ridge: float = 1e-2,
                     target: str = "dense", batch_size: int = 8, progress: bool = True
                     ) -> tuple[nn.Module, SurgeryReport]:
    """A pruned copy of ``dense`` for ``keep``, output projections refitted layer by layer (module docstring).

    Args:
        dense: the dense model (left unchanged).
        keep: the plan's kept groups per layer (:class:`gqaprune.pruning.surgery.LayerKeep`, indices into the
            dense layer's groups); layers not named are kept whole (but still advance both streams).
        samples: calibration token windows ``[n, seq_len]``.
        ridge: relative ridge of the refit (as ``surgery.ridge``).
        target: ``"dense"`` (refit towards the dense block outputs on the dense stream) or ``"self"``.
        batch_size: calibration windows per layer call.

    Returns:
        ``(pruned model, surgery report)``.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {list(TARGETS)}, got {target!r}")
    adapter = get_adapter(dense.config)
    geometry = adapter.geometry(dense.config)
    model = copy.deepcopy(dense).eval()
    d_layers, p_layers = adapter.layers(dense), adapter.layers(model)
    hidden, layer_kwargs = layer_inputs(dense, samples, batch_size)
    stream_d = [h.clone() for h in hidden]
    stream_p = [h.clone() for h in hidden]
    for i in tqdm(range(len(d_layers)), desc="sequential refit", disable=not progress):
        dl, pl = d_layers[i], p_layers[i]
        kwargs = layer_kwargs[i]
        k = keep.get(i)
        if k is not None:
            attn_kept = sorted(k.attn)
            if not isinstance(adapter.attention(pl), EmptyAttention):
                n_groups = adapter.attn_projections(pl)[1].out_features // geometry.head_dim
                prune_attention(pl, attn_kept, adapter, geometry)
                if 0 < len(attn_kept) < n_groups:
                    o_of = lambda layer: adapter.attn_projections(layer)[3]  # noqa: E731
                    if target == "dense":
                        new = _refit_dense(dl, pl, o_of, stream_d, stream_p, kwargs, ridge)
                    else:
                        width = geometry.q_per_kv * geometry.head_dim
                        cols = torch.as_tensor([g * width + j for g in attn_kept for j in range(width)])
                        new = _refit_self(adapter.attention(dl), pl, adapter.attention(pl),
                                          lambda blk: blk.o_proj, cols, stream_p, kwargs, ridge)
                    adapter.attention(pl).o_proj = new
            mlp_kept = sorted(k.mlp)
            if not isinstance(adapter.mlp(pl), EmptyMLP):
                n_channels = adapter.mlp_projections(pl)[0].out_features
                prune_mlp(pl, mlp_kept, adapter)
                if 0 < len(mlp_kept) < n_channels:
                    down_of = lambda layer: adapter.mlp_projections(layer)[2]  # noqa: E731
                    if target == "dense":
                        new = _refit_dense(dl, pl, down_of, stream_d, stream_p, kwargs, ridge)
                    else:
                        new = _refit_self(adapter.mlp(dl), pl, adapter.mlp(pl), lambda blk: blk.down_proj,
                                          torch.as_tensor(mlp_kept), stream_p, kwargs, ridge)
                    adapter.mlp(pl).down_proj = new
        with torch.inference_mode():
            stream_d = [_out(dl(h, **kw)) for h, kw in zip(stream_d, kwargs, strict=True)]
            stream_p = [_out(pl(h, **kw)) for h, kw in zip(stream_p, kwargs, strict=True)]
    # layers are already sliced: "keep everything that is left", so prune_model only drops emptied
    # layers and writes the per-layer geometry into the config
    shapes = {}
    for i, layer in enumerate(p_layers):
        attn = [] if isinstance(adapter.attention(layer), EmptyAttention) else list(
            range(adapter.attn_projections(layer)[1].out_features // geometry.head_dim))
        mlp = [] if isinstance(adapter.mlp(layer), EmptyMLP) else list(
            range(adapter.mlp_projections(layer)[0].out_features))
        shapes[i] = LayerKeep(attn=attn, mlp=mlp)
    report = prune_model(model, shapes)
    return model, report
