"""Model-family adapters: one interface, one adapter per family, chosen by ``config.model_type``.

Everything that differs between LLaMA, Qwen2 and Mistral lives here as data (which projections carry
biases, which class the pruned checkpoint loads with, how the embeddings are tied, which llama.cpp
architecture a GGUF export uses, what a sliding window means) so that groups, importance, surgery,
evaluation and the export never tell families apart by name.

GQA layout (shared by the three families), with ``r = num_attention_heads / num_key_value_heads``
query heads per KV head and ``d = head_dim``::

    k_proj / v_proj rows  [i*d,     (i+1)*d)      KV head i
    q_proj rows           [i*r*d,   (i+1)*r*d)    its r query heads
    o_proj columns        [i*r*d,   (i+1)*r*d)    the same query heads, read back into the residual

so "attention group i" is one KV head with its r query heads, and removing it keeps the Q:KV ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from gqaprune.errors import UnsupportedModelError
from gqaprune.models.hf_code import gqaprune_layout as layout


@dataclass(frozen=True)
class Geometry:
    """Architecture facts of a (dense) decoder, read from its config. All sizes are counts, not bytes."""

    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tied_embeddings: bool

    @property
    def q_per_kv(self) -> int:
        """r: query heads sharing one KV head (1 for plain multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @property
    def attn_group_cost(self) -> int:
        """Parameters of one attention group: k, v rows (d each), q rows (r*d), o columns (r*d), biases."""
        d, r, h = self.head_dim, self.q_per_kv, self.hidden_size
        bias = (r * d + 2 * d) if self.qkv_bias else 0
        return d * h * (2 * r + 2) + bias

    @property
    def mlp_channel_cost(self) -> int:
        """Parameters of one SwiGLU channel: a gate row, an up row and a down column (+ gate/up biases)."""
        return 3 * self.hidden_size + (2 if self.mlp_bias else 0)

    def to_dict(self) -> dict:
        """Plain-dict form, for artifact metadata."""
        return asdict(self)


class FamilyAdapter:
    """How to read geometry from a config and reach the prunable modules of one model family.

    The defaults describe the HF LLaMA module tree (``model.model.layers[i].self_attn.{q,k,v,o}_proj``,
    ``.mlp.{gate,up,down}_proj``), which Qwen2 and Mistral share; a family overrides only what differs.
    """

    model_type: ClassVar[str]
    #: Class name of the pruned model in the checkpoint's remote code (``hf_code/modeling_gqaprune.py``).
    pruned_class: ClassVar[str]

    #: (q/k/v, o_proj, MLP) bias flags when the family hard-codes them; None reads
    #: ``config.attention_bias`` / ``config.mlp_bias`` (LLaMA).
    fixed_biases: ClassVar[tuple[bool, bool, bool] | None] = None
    #: llama.cpp architecture of a GGUF export whose layers all keep one shape (per-layer shapes: ``deci``)
    gguf_arch: ClassVar[str] = "llama"
    #: whether llama.cpp's graph of ``gguf_arch`` sizes q / o as hidden x hidden and has no o / MLP biases
    #: (then a model whose heads x head_dim differ from hidden, or that gained such biases, goes to ``deci``)
    gguf_fixed_shapes: ClassVar[bool] = False
    #: a sliding attention window llama.cpp ignores: True exports with a warning (outputs agree up to the
    #: window), False refuses the export
    sliding_window_exportable: ClassVar[bool] = True

    def pruned_model_class(self):
        """The class of a pruned checkpoint with per-layer shapes (the package's own copy of its modeling code)."""
        from gqaprune.models.hf_code import modeling_gqaprune

        return getattr(modeling_gqaprune, self.pruned_class)

    def sliding_window(self, config) -> int | None:
        """The attention window the config applies (None: full attention)."""
        window = getattr(config, "sliding_window", None)
        return int(window) if window else None

    def biases(self, config) -> tuple[bool, bool, bool]:
        """Whether (q/k/v, o_proj, MLP projections) carry biases."""
        if self.fixed_biases is not None:
            return self.fixed_biases
        attn = bool(getattr(config, "attention_bias", False))
        return attn, attn, bool(getattr(config, "mlp_bias", False))

    def geometry(self, config) -> Geometry:
        """Read the geometry from a config, applying the HF defaults for absent keys, and check it."""
        heads = int(config.num_attention_heads)
        kv = getattr(config, "num_key_value_heads", None)
        kv = heads if kv is None else int(kv)  # absent: plain multi-head attention
        head_dim = layout.head_dim(config)
        if kv <= 0 or heads % kv != 0:
            raise UnsupportedModelError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}: "
                "GQA groups need an integer number of query heads per KV head"
            )
        qkv_bias, o_bias, mlp_bias = self.biases(config)
        return Geometry(
            model_type=self.model_type,
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=head_dim,
            intermediate_size=int(config.intermediate_size),
            vocab_size=int(config.vocab_size),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    # --- module access (the LLaMA module tree of gqaprune_layout; a family with another tree overrides) ----
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""
        return layout.decoder_layers(model)

    def set_layers(self, model: nn.Module, layers: Sequence[nn.Module]) -> None:
        """Replace the decoder layers (KV-cache slots renumbered over the remaining attention blocks)."""
        layout.set_decoder_layers(model, layers)

    def block(self, layer: nn.Module, kind: str) -> nn.Module:
        """The attention (``attn``) or MLP (``mlp``) block of a decoder layer."""
        return layout.block(layer, kind)

    def set_block(self, layer: nn.Module, kind: str, module: nn.Module) -> None:
        """Install ``module`` as a layer's attention or MLP block."""
        layout.set_block(layer, kind, module)

    def attention(self, layer: nn.Module) -> nn.Module:
        """The attention block of a decoder layer."""
        return layout.block(layer, layout.ATTN)

    def mlp(self, layer: nn.Module) -> nn.Module:
        """The MLP block of a decoder layer."""
        return layout.block(layer, layout.MLP)

    def members(self, layer: nn.Module, kind: str) -> list[tuple[layout.Member, nn.Linear]]:
        """(member, Linear) of every projection that a group of ``kind`` spans; [] for an emptied block."""
        return layout.members(layer, kind)

    def attn_projections(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """(q_proj, k_proj, v_proj, o_proj) of a layer."""
        return tuple(lin for _, lin in layout.members(layer, layout.ATTN))

    def mlp_projections(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """(gate_proj, up_proj, down_proj) of a layer."""
        return tuple(lin for _, lin in layout.members(layer, layout.MLP))

    def embeddings(self, model: nn.Module) -> nn.Embedding:
        """Input token embeddings."""
        return model.get_input_embeddings()

    def lm_head(self, model: nn.Module) -> nn.Linear:
        """Output projection to the vocabulary."""
        return model.get_output_embeddings()

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied after the last decoder layer."""
        return model.model.norm

    def rotary(self, model: nn.Module) -> nn.Module:
        """The rotary-embedding module (its buffers are not in checkpoints: rebuilt after meta loading)."""
        return model.model.rotary_emb

    def reset_rotary(self, model: nn.Module, device) -> None:
        """Rebuild the rotary embedding on ``device`` (after building the model on the meta device, or
        allocating it with ``to_empty``): checkpoints do not hold its buffers."""
        with torch.device("cpu"):  # built where buffers are real (not meta); its signature varies across versions
            rotary = type(self.rotary(model))(config=model.config)
        model.model.rotary_emb = rotary.to(device)

    def tie_weights(self, model: nn.Module) -> None:
        """Point the LM head at the input embeddings again when the config ties them (after assigning
        or allocating weights, which unties them)."""
        if getattr(model.config, "tie_word_embeddings", False):
            out, inp = self.lm_head(model), self.embeddings(model)
            if out is not None and out.weight is not inp.weight:
                out.weight = inp.weight


class LlamaAdapter(FamilyAdapter):
    """LLaMA 2/3 (GQA 4:1 at 8B), SmolLM2: biases follow ``attention_bias`` / ``mlp_bias``."""

    model_type = "llama"
    pruned_class = "PrunedLlamaForCausalLM"


class Qwen2Adapter(FamilyAdapter):
    """Qwen2 / Qwen2.5: q, k, v always carry biases, o_proj and the MLP never do; untied head at 7B."""

    model_type = "qwen2"
    pruned_class = "PrunedQwen2ForCausalLM"
    fixed_biases = (True, False, False)
    gguf_arch = "qwen2"
    gguf_fixed_shapes = True
    sliding_window_exportable = False  # use_sliding_window switches some layers to windowed attention

    def sliding_window(self, config) -> int | None:
        """The window, only when ``use_sliding_window`` turns it on (Qwen2 configs carry a window either way)."""
        window = getattr(config, "sliding_window", None)
        return int(window) if getattr(config, "use_sliding_window", False) and window else None


class MistralAdapter(FamilyAdapter):
    """Mistral 7B (GQA 4:1): no biases anywhere."""

    model_type = "mistral"
    pruned_class = "PrunedMistralForCausalLM"
    fixed_biases = (False, False, False)


ADAPTERS: dict[str, FamilyAdapter] = {a.model_type: a for a in (LlamaAdapter(), Qwen2Adapter(), MistralAdapter())}


def get_adapter(config) -> FamilyAdapter:
    """The adapter for ``config.model_type``; refuses unknown families and inconsistent geometry."""
    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported families: {', '.join(sorted(ADAPTERS))}"
        )
    adapter.geometry(config)  # validates heads / KV heads
    return adapter
