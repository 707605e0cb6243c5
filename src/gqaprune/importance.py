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

Memory: no gradient copy of the model is kept. Each projection's gradient is reduced into its
per-group float32 accumulators by a post-accumulate-grad hook as soon as backward produces it, and
then freed; embeddings, norms and lm_head get no gradients at all. Accumulation is float32
whatever the model's dtype.
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

from .adapters import FamilyAdapter, get_adapter
from .errors import NonFiniteError
from .groups import ATTN, MLP, group_table, layer_shapes
from .schema import ACTIVATION_METRICS, GRADIENT_METRICS, METRICS, LayerShape
from .torchutil import activation_checkpointing, check_finite_weights, watch_activations

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


def _members(layer: nn.Module, adapter: FamilyAdapter, shape: LayerShape):
    """(kind, parameter, role, reducer) for every parameter that belongs to a layer's groups.

    ``role`` names the input feeding the parameter for wanda ('attn_in', 'o_in', 'mlp_in', 'down_in',
    the members' ``reads``) or 'bias' (a bias entry is owned by the group owning its row).
    """
    out = []
    for kind, n in ((ATTN, shape.attn_groups), (MLP, shape.mlp_channels)):
        if not n:
            continue
        for member, lin in adapter.members(layer, kind):
            out.append((kind, lin.weight, member.reads, Reducer(n, "rows" if member.axis == 0 else "cols")))
            if lin.bias is not None and member.axis == 0:  # an output-projection bias belongs to no group
                out.append((kind, lin.bias, "bias", Reducer(n, "rows")))
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
def _only_group_params_trainable(model: nn.Module, params: Sequence[nn.Parameter]):
    """Temporarily give gradients to ``params`` only (embeddings, norms, lm_head get none)."""
    saved = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(p) for p in params}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None


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
) -> pd.DataFrame:
    """Score every group of ``model`` on calibration ``samples`` ([n, seq_len] token ids).

    Returns the group table (``layer``, ``kind``, ``index``, ``cost``) with one float64 column per
    requested metric. One forward (and, for taylor metrics, one backward) per micro-batch of
    ``gradient_batch_size`` samples.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"importance metrics {unknown or '[]'} are not among {list(METRICS)}")
    if gradient_batch_size < 1:
        raise ValueError("gradient_batch_size must be >= 1")
    check_calibration(samples)
    check_finite_weights(model)
    adapter = get_adapter(model.config)
    geometry = adapter.geometry(model.config)
    shapes = layer_shapes(model, adapter, geometry)
    table = group_table(shapes, geometry)
    device = next(model.parameters()).device
    need_grad = bool(GRADIENT_METRICS & set(metrics))
    need_data = need_grad or bool(ACTIVATION_METRICS & set(metrics))

    members = {s.layer: _members(adapter.layers(model)[s.layer], adapter, s) for s in shapes}
    # accumulators[(layer, kind)][metric] -> float32 [groups]
    acc: dict[tuple[int, str], dict[str, torch.Tensor]] = {}

    def add(layer: int, kind: str, metric: str, value: torch.Tensor) -> None:
        slot = acc.setdefault((layer, kind), {})
        slot[metric] = slot[metric] + value if metric in slot else value

    norms = _InputNorms()
    with ExitStack() as stack, torch.no_grad():
        if "magnitude" in metrics:
            for layer, items in members.items():
                for kind, p, _, reduce in items:
                    add(layer, kind, "magnitude", reduce(p.detach().float().abs()))
        checks: list[tuple[torch.Tensor, str]] = []  # per-gradient finiteness flags, read once per batch
        if need_data:
            if ACTIVATION_METRICS & set(metrics):  # the input statistics serve these only
                _register_input_hooks(model, adapter, shapes, norms, stack)
            if need_grad:
                params = [p for items in members.values() for _, p, _, _ in items]
                # parameters must require grad before a grad hook can be registered on them
                stack.enter_context(_only_group_params_trainable(model, params))
                _register_grad_hooks(members, add, stack, checks)
            _calibration_pass(model, samples.to(device), gradient_batch_size, need_grad,
                              gradient_checkpointing, norms, progress, checks)

    if "wanda" in metrics:
        with torch.no_grad():
            for layer, items in members.items():
                for kind, p, role, reduce in items:
                    w = p.detach().float().abs()
                    if role == "bias":
                        add(layer, kind, "wanda", reduce(w * math.sqrt(norms.tokens)))
                    else:
                        add(layer, kind, "wanda", reduce(w * norms.sumsq[(layer, role)].sqrt()[None, :]))

    if "fluctuation" in metrics:
        with torch.no_grad():
            for layer, items in members.items():
                for kind, p, role, reduce in items:
                    if role in ("o_in", "down_in"):
                        n = max(norms.tokens, 1)
                        mean = norms.sums[(layer, role)] / n
                        var = (norms.sumsq[(layer, role)] / n - mean.square()).clamp_min(0)  # [in]
                        add(layer, kind, "fluctuation", reduce(p.detach().float().square() * var[None, :]))

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


def _table_blocks(table: pd.DataFrame) -> list[tuple[int, str]]:
    """(layer, kind) blocks in the table's row order."""
    blocks = table[["layer", "kind"]].drop_duplicates()
    return [(int(r.layer), str(r.kind)) for r in blocks.itertuples(index=False)]


def _register_input_hooks(model, adapter: FamilyAdapter, shapes, norms: _InputNorms, stack: ExitStack) -> None:
    """Hook the input of every distinct activation a group member reads (q/k/v share one, gate/up one)."""
    layers = adapter.layers(model)
    for s in shapes:
        layer = layers[s.layer]
        hooked: dict[str, nn.Module] = {}
        for kind, n in ((ATTN, s.attn_groups), (MLP, s.mlp_channels)):
            for member, lin in adapter.members(layer, kind) if n else []:
                hooked.setdefault(member.reads, lin)
        for role, module in hooked.items():
            handle = module.register_forward_pre_hook(norms.hook((s.layer, role)))
            stack.callback(handle.remove)


def _register_grad_hooks(members, add, stack: ExitStack, checks: list) -> None:
    """Reduce each projection gradient into per-group |w g| and (w g)^2 sums, then free it.

    The finiteness of each reduction is recorded in ``checks`` as a device flag (no host sync inside
    backward); :func:`_raise_if_nonfinite` reads them once per micro-batch.
    """

    def make(layer: int, kind: str, reduce: Reducer, name: str):
        def hook(p: torch.Tensor) -> None:
            w, g = p.detach(), p.grad
            # exact float32 product w*g (a bf16*bf16 product fits float32), one float32 temporary
            wg = w * g if w.dtype == torch.float32 else w.float().mul_(g)
            first, second = reduce.abs_and_square_sums(wg)
            del wg
            p.grad = None  # free the gradient now: no model-sized gradient copy is ever held
            checks.append((torch.isfinite(first).all() & torch.isfinite(second).all(),
                           f"non-finite gradient in layer {layer} {name}: the loss or gradients overflowed; "
                           "score in float32 (score.dtype) or check the calibration data"))
            add(layer, kind, "taylor", first)
            add(layer, kind, "taylor_2nd", first + 0.5 * second)

        return hook

    for layer, items in members.items():
        for n, (kind, p, role, reduce) in enumerate(items):
            handle = p.register_post_accumulate_grad_hook(make(layer, kind, reduce, f"{kind} parameter {n} ({role})"))
            stack.callback(handle.remove)


def _raise_if_nonfinite(checks: list) -> None:
    """Raise NonFiniteError naming the first non-finite value recorded in ``checks`` (one host sync)."""
    if not checks:
        return
    ok = torch.stack([flag for flag, _ in checks])
    if not bool(ok.all()):
        first_bad = int((~ok).nonzero()[0, 0])
        raise NonFiniteError(checks[first_bad][1])
    checks.clear()


def _calibration_pass(model, samples: torch.Tensor, batch: int, need_grad: bool, checkpointing: bool,
                      norms: _InputNorms, progress: bool, checks: list | None = None) -> None:
    """Forward (+ backward) over ``samples`` in micro-batches; hooks do the accounting."""
    checks = checks if checks is not None else []
    try:
        with activation_checkpointing(model, need_grad and checkpointing), watch_activations(model, checks):
            steps = range(0, samples.shape[0], batch)
            for start in tqdm(steps, desc="calibration", disable=not progress, unit="batch"):
                ids = samples[start:start + batch]
                norms.enabled = True
                if need_grad:
                    with torch.enable_grad():
                        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                        _raise_if_nonfinite(checks)  # a non-finite activation is named before the loss
                        if not torch.isfinite(loss):
                            raise NonFiniteError(f"non-finite calibration loss ({loss.item()}) at sample {start}")
                        norms.enabled = False  # a checkpointed backward re-runs forwards: do not count twice
                        loss.backward()
                else:
                    model(input_ids=ids, use_cache=False)
                _raise_if_nonfinite(checks)
                norms.tokens += ids.numel()
    finally:
        norms.enabled = True
