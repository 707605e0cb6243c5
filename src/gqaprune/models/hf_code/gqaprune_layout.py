"""The LLaMA-family decoder layout: where the prunable modules sit and which rows / columns a group owns.

This is the one definition of a prunable group, used by importance scoring, surgery, output
compensation and the modeling code saved with pruned checkpoints. It depends on torch only, because
it is saved next to ``modeling_gqaprune.py`` in a checkpoint and loaded by transformers'
``trust_remote_code`` machinery, where the ``gqaprune`` package may not be installed.

Group kinds (``r`` = query heads per KV head, ``d`` = head_dim)::

    attn group i   q_proj  rows  [i*r*d, (i+1)*r*d)  (+ bias)   its r query heads
                   k_proj  rows  [i*d,   (i+1)*d)    (+ bias)   KV head i
                   v_proj  rows  [i*d,   (i+1)*d)    (+ bias)
                   o_proj  cols  [i*r*d, (i+1)*r*d)             read back into the residual
    mlp group i    gate_proj, up_proj  row i (+ bias)           SwiGLU channel i
                   down_proj           col i

Removing a whole attention group keeps the Q:KV ratio. The module tree is the HF LLaMA one
(``model.model.layers[i].self_attn.{q,k,v,o}_proj``, ``.mlp.{gate,up,down}_proj``), which Qwen2 and
Mistral share. A block whose groups are all removed becomes :class:`EmptyAttention` /
:class:`EmptyMLP` (it adds nothing to the residual stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

ATTN = "attn"
MLP = "mlp"
KINDS = (ATTN, MLP)

#: attribute of a decoder layer holding each block
BLOCK_ATTR = {ATTN: "self_attn", MLP: "mlp"}


@dataclass(frozen=True)
class Member:
    """One projection spanned by a group kind.

    ``axis`` 0: a group owns consecutive output rows (and the matching bias entries); 1: consecutive
    input columns. ``unit`` says how many rows / columns one group owns: ``"query"`` r*d, ``"head"`` d,
    ``"channel"`` 1. ``reads`` names the activation the projection reads (wanda / compensation
    statistics): projections with the same ``reads`` share one input.
    """

    name: str
    axis: int
    unit: str
    reads: str


GROUP_KINDS: dict[str, tuple[Member, ...]] = {
    ATTN: (Member("q_proj", 0, "query", "attn_in"), Member("k_proj", 0, "head", "attn_in"),
           Member("v_proj", 0, "head", "attn_in"), Member("o_proj", 1, "query", "o_in")),
    MLP: (Member("gate_proj", 0, "channel", "mlp_in"), Member("up_proj", 0, "channel", "mlp_in"),
          Member("down_proj", 1, "channel", "down_in")),
}
#: the member that writes the block's output into the residual stream (the one compensation refits)
OUTPUT = {kind: next(m for m in members if m.axis == 1) for kind, members in GROUP_KINDS.items()}
#: the member whose output width counts the groups (KV heads / channels)
COUNTER = {ATTN: GROUP_KINDS[ATTN][1], MLP: GROUP_KINDS[MLP][0]}


def head_dim(config) -> int:
    """head_dim from a (dense) config: ``config.head_dim``, else hidden_size / num_attention_heads."""
    value = getattr(config, "head_dim", None)
    return int(value) if value else int(config.hidden_size) // int(config.num_attention_heads)


def q_per_kv(config) -> int:
    """Query heads per KV head of a (dense) config; an absent num_key_value_heads means plain MHA."""
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(config.num_attention_heads) // int(kv)


def unit_width(unit: str, ratio: int, dim: int) -> int:
    """Rows / columns one group owns in a member of ``unit`` (ratio = r, dim = head_dim)."""
    return {"query": ratio * dim, "head": dim, "channel": 1}[unit]


def group_indices(groups: Sequence[int], width: int) -> torch.Tensor:
    """Row (or column) indices of whole groups of ``width`` consecutive rows: [g*width, (g+1)*width)."""
    g = torch.as_tensor(list(groups), dtype=torch.long)
    return (g[:, None] * width + torch.arange(width)[None, :]).reshape(-1)


class EmptyAttention(nn.Module):
    """An attention block whose groups were all pruned: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """Return zeros shaped like the input and no attention weights, as HF attention modules do."""
        return torch.zeros_like(hidden_states), None


class EmptyMLP(nn.Module):
    """An MLP block whose channels were all pruned: it adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Return zeros shaped like the input."""
        return torch.zeros_like(hidden_states)


EMPTY = {ATTN: EmptyAttention, MLP: EmptyMLP}


# --- module tree --------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, in order."""
    return model.model.layers


def set_decoder_layers(model: nn.Module, layers: Sequence[nn.Module]) -> None:
    """Replace the decoder layers and give the remaining attention blocks consecutive KV-cache slots."""
    model.model.layers = nn.ModuleList(list(layers))
    renumber_cache_slots(model.model.layers)


def block(layer: nn.Module, kind: str) -> nn.Module:
    """The attention (``attn``) or MLP (``mlp``) block of a decoder layer."""
    return getattr(layer, BLOCK_ATTR[kind])


def set_block(layer: nn.Module, kind: str, module: nn.Module) -> None:
    """Install ``module`` as the layer's attention or MLP block."""
    setattr(layer, BLOCK_ATTR[kind], module)


def is_empty(layer: nn.Module, kind: str) -> bool:
    """Whether the layer's block of ``kind`` was emptied."""
    return isinstance(block(layer, kind), EMPTY[kind])


def projection(layer: nn.Module, kind: str, name: str) -> nn.Linear:
    """One projection of a block, by member name."""
    return getattr(block(layer, kind), name)


def members(layer: nn.Module, kind: str) -> list[tuple[Member, nn.Linear]]:
    """(member, Linear) of every projection a group kind spans in this layer; [] for an emptied block."""
    if is_empty(layer, kind):
        return []
    b = block(layer, kind)
    return [(m, getattr(b, m.name)) for m in GROUP_KINDS[kind]]


def group_count(layer: nn.Module, kind: str, dim: int) -> int:
    """Groups the layer's block currently has (KV heads or MLP channels); 0 when emptied."""
    if is_empty(layer, kind):
        return 0
    rows = projection(layer, kind, COUNTER[kind].name).out_features
    return rows // unit_width(COUNTER[kind].unit, 1, dim)


def renumber_cache_slots(layers: nn.ModuleList) -> None:
    """Give the attention blocks that still exist consecutive KV-cache slots 0..A-1.

    HF caches ask slot 0 for the sequence length, so slot numbers must not skip pruned attention.
    """
    slot = 0
    for layer in layers:
        if not is_empty(layer, ATTN):
            block(layer, ATTN).layer_idx = slot
            slot += 1


# --- reshaping blocks ---------------------------------------------------------------------------
def _new_linear(like: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """A fresh Linear of the given shape on ``like``'s device and dtype (uninitialised: its weights are always
    written afterwards, and random initialisation of a large layer costs seconds)."""
    w = like.weight
    return torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, device=w.device, dtype=w.dtype)


def resize_block(layer: nn.Module, kind: str, groups: int, ratio: int, dim: int,
                 output_bias: bool = False) -> None:
    """Give the layer's block ``groups`` groups (uninitialised weights, loaded afterwards), in place.

    ``groups == 0`` empties the block. ``output_bias`` gives the output projection a bias the family
    does not have (FLAP-style bias compensation stores the removed inputs' mean contribution there).
    Used by the saved modeling code to build a checkpoint's per-layer shapes before loading weights.
    """
    if groups == 0:
        set_block(layer, kind, EMPTY[kind]())
        return
    b = block(layer, kind)
    for m, lin in members(layer, kind):
        n = groups * unit_width(m.unit, ratio, dim)
        shape = (lin.in_features, n) if m.axis == 0 else (n, lin.out_features)
        bias = lin.bias is not None or (m.axis == 1 and output_bias)
        if (shape[1], shape[0]) != tuple(lin.weight.shape) or bias != (lin.bias is not None):
            setattr(b, m.name, _new_linear(lin, *shape, bias=bias))


def slice_block(layer: nn.Module, kind: str, keep: Sequence[int], ratio: int, dim: int) -> None:
    """Keep only groups ``keep`` (ascending indices into the current groups) of the layer's block, in place.

    Every member is replaced by a smaller Linear holding the kept rows (with their bias entries) or
    columns; keeping nothing empties the block.
    """
    if is_empty(layer, kind):
        if keep:
            raise ValueError(f"cannot keep groups of an emptied {kind} block")
        return
    if list(keep) == list(range(group_count(layer, kind, dim))):
        return
    if not keep:
        set_block(layer, kind, EMPTY[kind]())
        return
    b = block(layer, kind)
    for m, lin in members(layer, kind):
        idx = group_indices(keep, unit_width(m.unit, ratio, dim)).to(lin.weight.device)
        w = lin.weight.detach().index_select(m.axis, idx)  # weight is [out, in]: axis 0 rows, 1 columns
        bias = lin.bias
        if bias is not None and m.axis == 0:
            bias = bias.detach().index_select(0, idx)
        new = _new_linear(lin, w.shape[1], w.shape[0], bias=bias is not None)
        with torch.no_grad():
            new.weight.copy_(w)
            if bias is not None:
                new.bias.copy_(bias)
        new.requires_grad_(lin.weight.requires_grad)
        setattr(b, m.name, new)
