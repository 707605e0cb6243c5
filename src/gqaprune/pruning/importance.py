"""Group importance: magnitude, wanda, taylor, taylor_2nd, fluctuation, in one pass over calibration data.

Per-parameter scores (SPEC.md), summed over each group's members:

* ``magnitude``  |w|
* ``wanda``      |w_ij| * ||x_j||_2, x_j the input feature j of that projection over all calibration
  tokens (q/k/v and gate/up read the normed residual, o_proj the attention output, down_proj the
  SwiGLU product); a bias is fed by a constant 1, so its score is |b| * sqrt(tokens).
* ``taylor``     sum over micro-batches b of |w * g_b|, g_b = dL_b/dw with L_b the mean token loss
  of micro-batch b.
* ``taylor_2nd`` sum over b of |w*g_b| + 0.5 * (w*g_b)^2, i.e. |w g| + 0.5 |w^2 H_diag| with the
  Hessian diagonal approximated by the empirical Fisher g^2, accumulated per micro-batch.
* ``fluctuation`` (FLAP) Var_t(x_j) * ||W[:, j]||^2 over the input columns j of o_proj (a group's
  head columns) and down_proj (its channel): how much removing the column perturbs the block output
  beyond the mean shift that bias compensation restores. Output projections only, as in FLAP.

Memory: no gradient copy of the model is kept. No parameter requires grad while scoring; a *tap* on
each projection's output computes that micro-batch's weight gradient in backward from the output
gradient and the saved input, reduces it into the per-group float32 accumulators and frees it (one
projection's gradient at a time); embeddings, norms and lm_head get no gradients at all.
Accumulation is float32 whatever the model's dtype.

Several processes (``ctx``): the micro-batches are split over the ranks, the accumulators and input
statistics added up; the model may be replicated or FSDP2-sharded (the taps never let FSDP sum
gradients over ranks before the absolute value, which would change Taylor). One process runs the
same code with a context whose collectives are no-ops.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from gqaprune.config.choices import ACTIVATION_METRICS, GRADIENT_METRICS, METRICS, WEIGHT_METRICS
from gqaprune.errors import NonFiniteError
from gqaprune.models.adapters import FamilyAdapter, get_adapter
from gqaprune.models.groups import group_table, layer_shapes
from gqaprune.models.modules import activation_checkpointing, check_finite_weights, watch_activations
from gqaprune.models.units import ATTN, MLP, LayerShape
from gqaprune.runtime.distributed import DistContext, single_process
from gqaprune.runtime.placement import full_tensor, is_dtensor, is_sharded

log = logging.getLogger(__name__)

__all__ = ["METRICS", "GRADIENT_METRICS", "Reducer", "check_calibration", "score_groups"]

class Reducer:
    """Maps an elementwise score tensor of one parameter to one value per group: [groups].

    Groups own consecutive equal blocks of output rows (``axis="rows"``: q/k/v/gate/up weights and
    their biases) or of input columns (``axis="cols"``: o_proj / down_proj weights).
    """

    def __init__(self, groups: int, axis: str):
        self.groups, self.axis = groups, axis

    def _view(self, s: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if self.axis == "rows":
            return s.reshape(self.groups, -1), (1,)
        return s.reshape(s.shape[0], self.groups, -1), (0, 2)

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        v, dims = self._view(s)
        return v.sum(dims)

    def abs_and_square_sums(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group sums of |s| and of s^2 (two reading passes over ``s``, no temporaries)."""
        v, dims = self._view(s)
        return (torch.linalg.vector_norm(v, 1, dim=dims),
                torch.linalg.vector_norm(v, 2, dim=dims).square())


def _projections(layer: nn.Module, adapter: FamilyAdapter, shape: LayerShape):
    """(kind, member, Linear, reducer) of every projection that a layer's groups span (the layout's members)."""
    out = []
    for kind, n in ((ATTN, shape.attn_groups), (MLP, shape.mlp_channels)):
        if n:
            for member, lin in adapter.members(layer, kind):
                out.append((kind, member, lin, Reducer(n, "rows" if member.axis == 0 else "cols")))
    return out


def _members(layer: nn.Module, adapter: FamilyAdapter, shape: LayerShape):
    """(kind, parameter, role, reducer) for every parameter that belongs to a layer's groups.

    ``role`` names the input feeding the parameter for wanda ('attn_in', 'o_in', 'mlp_in', 'down_in',
    the members' ``reads``) or 'bias' (a bias entry is owned by the group owning its row).
    """
    out = []
    for kind, member, lin, reduce in _projections(layer, adapter, shape):
        out.append((kind, lin.weight, member.reads, reduce))
        if lin.bias is not None and member.axis == 0:  # an output-projection bias belongs to no group
            out.append((kind, lin.bias, "bias", reduce))
    return out


class _InputNorms:
    """Forward hooks that accumulate sums over tokens of x_j^2 and x_j (float32) at projection inputs."""

    def __init__(self):
        self.sumsq: dict[tuple[int, str], torch.Tensor] = {}
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.tokens = 0
        self.enabled = True

    def hook(self, key: tuple[int, str]):
        def fn(module, args):
            if not self.enabled:  # gradient-checkpointing recomputation: already counted
                return
            x = args[0].detach()
            # one reading pass, float32 accumulation, no float32 copy of the activation
            acc = torch.linalg.vector_norm(x.reshape(-1, x.shape[-1]), 2, dim=0,
                                           dtype=torch.float32).square()  # [in_features]
            self.sumsq[key] = self.sumsq[key] + acc if key in self.sumsq else acc
            total = x.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32)  # [in_features]
            self.sums[key] = self.sums[key] + total if key in self.sums else total

        return fn


@contextmanager
def _frozen(model: nn.Module):
    """No parameter requires grad for the block (taps compute the gradients); the flags are restored after."""
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


class _Tap(torch.autograd.Function):
    """Identity on a projection's output ``y`` that calls ``fn(x, dy)`` in backward, ``x`` (its input) saved.

    ``save_for_backward`` lets activation checkpointing drop and recompute ``x`` like any saved activation.
    """

    @staticmethod
    def forward(ctx, y, x, fn):
        ctx.fn = fn
        ctx.save_for_backward(x)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        ctx.fn(x, dy)
        return dy, None, None


class _Pass:
    """State of the calibration pass: whether the micro-batch counts (not a lock-step repeat), finiteness flags."""

    def __init__(self):
        self.active = True
        self.checks: list = []


def check_calibration(samples: torch.Tensor) -> None:
    """Refuse empty or malformed calibration data before any compute."""
    if not isinstance(samples, torch.Tensor) or samples.dim() != 2 or samples.dtype != torch.long:
        raise ValueError("calibration samples must be a LongTensor of shape [n_samples, seq_len]")
    if samples.numel() == 0 or samples.shape[1] < 2:
        raise ValueError(f"calibration data is empty or too short (shape {tuple(samples.shape)}); "
                         "need at least one sample of 2+ tokens")


def score_groups(
    model: nn.Module,
    samples: torch.Tensor,
    metrics: Sequence[str] = METRICS,
    gradient_batch_size: int = 4,
    gradient_checkpointing: bool = False,
    progress: bool = True,
    ctx: DistContext | None = None,
) -> pd.DataFrame:
    """Score every group of ``model`` on calibration ``samples`` ([n, seq_len] token ids).

    Returns the group table (``layer``, ``kind``, ``index``, ``cost``) with one float64 column per
    requested metric. One forward (and, for taylor metrics, one backward) per micro-batch of
    ``gradient_batch_size`` samples.

    ``ctx`` (default: one process): on N ranks every rank calls this with the same ``samples`` and its
    replica or FSDP2 shard of the model; rank r runs a contiguous share of the micro-batches (the same
    micro-batches as one process), the per-group sums are added up over the ranks, and every rank
    returns the same table (equal to one process's up to float summation order).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"importance metrics {unknown or '[]'} are not among {list(METRICS)}")
    if gradient_batch_size < 1:
        raise ValueError("gradient_batch_size must be >= 1")
    ctx = ctx or single_process()
    check_calibration(samples)
    check_finite_weights(model)
    adapter = get_adapter(model.config)
    geometry = adapter.geometry(model.config)
    shapes = layer_shapes(model, adapter, geometry)
    table = group_table(shapes, geometry)
    device = next(model.parameters()).device
    need_grad = bool(GRADIENT_METRICS & set(metrics))
    need_inputs = bool(ACTIVATION_METRICS & set(metrics))
    layers = adapter.layers(model)
    projections = {s.layer: _projections(layers[s.layer], adapter, s) for s in shapes}

    # accumulators[(layer, kind)][metric] -> float32 [groups]; the data-dependent ones start at zero so
    # that every rank holds the same tensors to add up, even a rank without micro-batches
    acc: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def add(layer: int, kind: str, metric: str, value: torch.Tensor) -> None:
        slot = acc.setdefault((layer, kind), {})
        slot[metric] = slot[metric] + value if metric in slot else value

    if need_grad:
        for s in shapes:
            for kind, n in ((ATTN, s.attn_groups), (MLP, s.mlp_channels)):
                for metric in sorted(GRADIENT_METRICS) if n else ():
                    add(s.layer, kind, metric, torch.zeros(n, dtype=torch.float32, device=device))
    norms = _InputNorms()
    state = _Pass()
    sharded = is_sharded(model)
    units = ctx.split_units(math.ceil(samples.shape[0] / gradient_batch_size), lockstep=sharded)
    with ExitStack() as stack:
        if need_inputs:  # the input statistics serve wanda and fluctuation only
            _register_input_hooks(projections, norms, stack, device)
        if need_grad:
            stack.enter_context(_frozen(model))
            emb = adapter.embeddings(model)  # its output requires grad: backward reaches every layer
            stack.callback(emb.register_forward_hook(lambda m, a, out: out.requires_grad_(True)).remove)
            _register_taps(projections, add, state, stack)
        if need_grad or need_inputs:
            _calibration_pass(model, samples.to(device), gradient_batch_size, units, need_grad,
                              gradient_checkpointing, norms, state, progress and ctx.is_main)

    if ctx.is_distributed:  # add up the ranks' sums (float64 on the wire), in one fixed order
        parts = [acc[key][m] for key in sorted(acc) for m in sorted(GRADIENT_METRICS) if m in acc[key]]
        parts += [norms.sumsq[k] for k in sorted(norms.sumsq)] + [norms.sums[k] for k in sorted(norms.sums)]
        wire = [t.double() for t in parts] + [torch.tensor([float(norms.tokens)], dtype=torch.float64)]
        ctx.all_reduce_(wire)
        for t, total in zip(parts, wire, strict=False):
            t.copy_(total)
        norms.tokens = int(wire[-1].item())

    weight_metrics = sorted(WEIGHT_METRICS & set(metrics))
    if ctx.is_distributed and not sharded and weight_metrics:
        # replicas: each rank reads the weights of its share of the layers only, the others add zeros
        mine = [shapes[i] for i in ctx.shard(len(shapes))]
        for s in shapes:
            for kind, n in ((ATTN, s.attn_groups), (MLP, s.mlp_channels)):
                for metric in weight_metrics if n else ():
                    add(s.layer, kind, metric, torch.zeros(n, dtype=torch.float32, device=device))
        _weight_metrics(layers, adapter, mine, metrics, norms, add)
        parts = [acc[key][m] for key in sorted(acc) for m in weight_metrics if m in acc[key]]
        ctx.all_reduce_(parts)  # exact: every group's value comes from one rank, the rest are zeros
    else:  # one process, or FSDP shards (each weight is gathered collectively, so every rank reads all)
        _weight_metrics(layers, adapter, shapes, metrics, norms, add)
    for metric in metrics:
        table[metric] = torch.cat(
            [acc[(int(layer), kind)][metric].double().cpu() for layer, kind in _table_blocks(table)]
        ).numpy()
        bad = ~np.isfinite(table[metric].to_numpy())
        if bad.any():
            row = table[bad].iloc[0]
            raise NonFiniteError(f"{metric} score of {row['kind']} group {int(row['index'])} in layer "
                                 f"{int(row['layer'])} is not finite; check that layer's weights")
    return table


def _weight_metrics(layers, adapter: FamilyAdapter, shapes, metrics, norms: _InputNorms, add) -> None:
    """magnitude, wanda and fluctuation from the whole weights, one parameter at a time (gathered when sharded)."""
    want = WEIGHT_METRICS & set(metrics)
    if not want:
        return
    with torch.no_grad():
        for s in shapes:
            for kind, p, role, reduce in _members(layers[s.layer], adapter, s):
                full = full_tensor(p.detach())  # collective when sharded: the same order on every rank
                w = full.float().abs()
                if "magnitude" in want:
                    add(s.layer, kind, "magnitude", reduce(w))
                if "wanda" in want:
                    if role == "bias":
                        add(s.layer, kind, "wanda", reduce(w * math.sqrt(norms.tokens)))
                    else:
                        add(s.layer, kind, "wanda", reduce(w * norms.sumsq[(s.layer, role)].sqrt()[None, :]))
                if "fluctuation" in want and role in ("o_in", "down_in"):
                    n = max(norms.tokens, 1)
                    mean = norms.sums[(s.layer, role)] / n
                    var = (norms.sumsq[(s.layer, role)] / n - mean.square()).clamp_min(0)  # [in]
                    add(s.layer, kind, "fluctuation", reduce(w.square() * var[None, :]))  # |w|^2 = w^2
                del full, w


def _table_blocks(table: pd.DataFrame) -> list[tuple[int, str]]:
    """(layer, kind) blocks in the table's row order."""
    blocks = table[["layer", "kind"]].drop_duplicates()
    return [(int(r.layer), str(r.kind)) for r in blocks.itertuples(index=False)]


def _register_input_hooks(projections, norms: _InputNorms, stack: ExitStack, device) -> None:
    """Hook the input of every distinct activation a group member reads (q/k/v share one, gate/up one);
    the sums start at zero so every rank holds the same tensors."""
    for layer, items in projections.items():
        hooked: dict[str, nn.Linear] = {}
        for _, member, lin, _ in items:
            hooked.setdefault(member.reads, lin)
        for role, module in hooked.items():
            key = (layer, role)
            norms.sumsq[key] = torch.zeros(module.in_features, dtype=torch.float32, device=device)
            norms.sums[key] = torch.zeros(module.in_features, dtype=torch.float32, device=device)
            stack.callback(module.register_forward_pre_hook(norms.hook(key)).remove)


def _wg_sums(w: torch.Tensor, g: torch.Tensor, reduce: Reducer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group sums of |w g| and (w g)^2 (exact float32 product: a bf16*bf16 product fits float32)."""
    wg = w * g if w.dtype == torch.float32 else w.float().mul_(g)
    return reduce.abs_and_square_sums(wg)


def _register_taps(projections, add, state: _Pass, stack: ExitStack) -> None:
    """Put a :class:`_Tap` on every projection output; in backward it reduces that micro-batch's ``w * g``.

    The tap receives ``dY`` (the gradient of the projection's output) and computes the weight gradient
    ``g = dY^T x`` (bias: ``sum_t dY``) with the matmul autograd would use, reduces it into per-group
    |w g| and (w g)^2 sums and frees it: one projection's gradient at a time, no parameter ever gets a
    ``.grad`` (none requires grad) and FSDP has nothing to reduce-scatter. Under FSDP2 the layer is
    unsharded for its backward (its output requires grad), so the weight read here is whole. The
    finiteness of each reduction is recorded in ``state.checks`` as a device flag (no host sync inside
    backward); :func:`_raise_if_nonfinite` reads them once per micro-batch.
    """

    def reduce_into(layer: int, kind: str, value: torch.Tensor, g: torch.Tensor, reduce: Reducer, name: str):
        first, second = _wg_sums(value.detach(), g, reduce)
        state.checks.append((torch.isfinite(first).all() & torch.isfinite(second).all(),
                             f"non-finite gradient in layer {layer} {name}: the loss or gradients overflowed; "
                             "score in float32 (score.dtype) or check the calibration data"))
        add(layer, kind, "taylor", first)
        add(layer, kind, "taylor_2nd", first + 0.5 * second)

    def make(layer: int, kind: str, member, lin: nn.Linear, reduce: Reducer):
        def on_backward(x: torch.Tensor, dy: torch.Tensor) -> None:
            if not state.active:  # a lock-step repeat: run, not counted
                return
            if is_dtensor(lin.weight):
                raise RuntimeError(f"layer {layer} {member.name}: the weight is still sharded in backward")
            with torch.no_grad():
                dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # [tokens, out], [tokens, in]
                if lin.bias is not None and member.axis == 0:  # an output-projection bias belongs to no group
                    reduce_into(layer, kind, lin.bias, dy2.sum(0), reduce, f"{member.name}.bias")
                g = dy2.t().mm(x2)  # [out, in]: the weight gradient of this micro-batch
                reduce_into(layer, kind, lin.weight, g, reduce, f"{member.name}.weight")
                del g

        def hook(module, args, output):
            if torch.is_grad_enabled() and output.requires_grad:
                return _Tap.apply(output, args[0], on_backward)
            return None

        return hook

    for layer, items in projections.items():
        for kind, member, lin, reduce in items:
            stack.callback(lin.register_forward_hook(make(layer, kind, member, lin, reduce)).remove)


def _raise_if_nonfinite(checks: list) -> None:
    """Raise NonFiniteError naming the first non-finite value recorded in ``checks`` (one host sync)."""
    if not checks:
        return
    ok = torch.stack([flag for flag, _ in checks])
    if not bool(ok.all()):
        first_bad = int((~ok).nonzero()[0, 0])
        raise NonFiniteError(checks[first_bad][1])
    checks.clear()


def _calibration_pass(model, samples: torch.Tensor, batch: int, units, need_grad: bool, checkpointing: bool,
                      norms: _InputNorms, state: _Pass, progress: bool) -> None:
    """Forward (+ backward) over this rank's micro-batches ``units``; hooks and taps do the accounting.

    An inactive unit (a lock-step repeat on a sharded model) runs like the others and counts nothing.
    """
    checks = state.checks
    try:
        with activation_checkpointing(model, need_grad and checkpointing), watch_activations(model, checks):
            for unit, active in tqdm(units, desc="calibration", disable=not progress, unit="batch"):
                start = unit * batch
                ids = samples[start:start + batch]
                state.active = norms.enabled = active
                if need_grad:
                    with torch.enable_grad():
                        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                        _raise_if_nonfinite(checks)  # a non-finite activation is named before the loss
                        if active and not torch.isfinite(loss):
                            raise NonFiniteError(f"non-finite calibration loss ({loss.item()}) at sample {start}")
                        norms.enabled = False  # a checkpointed backward re-runs forwards: do not count twice
                        loss.backward()
                else:
                    with torch.no_grad():
                        model(input_ids=ids, use_cache=False)
                _raise_if_nonfinite(checks)
                if active:
                    norms.tokens += ids.numel()
    finally:
        norms.enabled = state.active = True
