"""Declarative adapters: where each architecture family keeps its MLP, and how its weights are laid out.

In the spirit of TransformerLens' per-family adapter files: an adapter only *describes* the model
(which submodule is gate / up / down, whether weights are stored [in, out]); it holds no kernels
and knows nothing about sparsity. Adapters are looked up by `config.model_type`.

Paths are dotted attribute paths. `layers` is relative to `model.base_model`; every other path is
relative to one decoder / encoder layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import InputError


@dataclass(frozen=True)
class MLPAdapter:
    family: str
    kind: str                      # "causal-lm" | "encoder"
    layers: str                    # ModuleList of blocks, relative to model.base_model
    entry: str                     # the module that a sparse wrapper replaces (computes the whole MLP)
    act: str                       # activation module
    down: str                      # output projection
    gate: str | None = None        # projection that goes through `act` (GLU gate, or W_in when not GLU)
    up: str | None = None          # GLU up projection (None: not GLU)
    gate_up: str | None = None     # fused [gate; up] projection (Phi-3), gate first
    tail: tuple[str, ...] = ()     # modules after `entry` that belong to the MLP (OPT, BERT)
    conv1d: bool = False           # weights stored [in, out] (GPT-2 Conv1D)
    router: str | None = None      # MoE: router returning (logits, top-k weights, top-k indices)
    experts: str | None = None     # MoE: fused experts (gate_up_proj [E, 2*d_ff, d], down_proj [E, d, d_ff])

    @property
    def is_moe(self) -> bool:
        return self.experts is not None


_GLU = dict(kind="causal-lm", layers="layers", entry="mlp", gate="mlp.gate_proj",
            up="mlp.up_proj", down="mlp.down_proj", act="mlp.act_fn")

ADAPTERS: dict[str, MLPAdapter] = {
    **{t: MLPAdapter(family="glu", **_GLU)
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo")},
    "phi3": MLPAdapter(family="glu", kind="causal-lm", layers="layers", entry="mlp",
                       gate_up="mlp.gate_up_proj", down="mlp.down_proj", act="mlp.activation_fn"),
    "gpt2": MLPAdapter(family="gpt2", kind="causal-lm", layers="h", entry="mlp", gate="mlp.c_fc",
                       down="mlp.c_proj", act="mlp.act", conv1d=True),
    "opt": MLPAdapter(family="opt", kind="causal-lm", layers="decoder.layers", entry="fc1",
                      gate="fc1", down="fc2", act="activation_fn", tail=("activation_fn", "fc2")),
    "bert": MLPAdapter(family="bert", kind="encoder", layers="encoder.layer", entry="intermediate",
                       gate="intermediate.dense", down="output.dense",
                       act="intermediate.intermediate_act_fn", tail=("output.dense",)),
    "mixtral": MLPAdapter(family="moe", kind="causal-lm", layers="layers", entry="mlp",
                          down="mlp.experts.down_proj", act="mlp.experts.act_fn",
                          router="mlp.gate", experts="mlp.experts"),
    # -- dense families of 2024-2026 (issue 13, part A); tiny-config tests in tests/test_families.py --
    # Gemma 3 (sliding and global layers, scaled embedding), OLMo 2/3 (norms after the MLP) and SmolLM3
    # differ from Llama outside the MLP only, which the wrappers leave as shipped.
    **{t: MLPAdapter(family="glu", **_GLU) for t in ("gemma3_text", "olmo2", "olmo3", "smollm3")},
    # Pythia (attention and MLP in parallel from one residual) and StarCoder2: Linear with bias, GELU.
    "gpt_neox": MLPAdapter(family="mlp", kind="causal-lm", layers="layers", entry="mlp",
                           gate="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", act="mlp.act"),
    "starcoder2": MLPAdapter(family="mlp", kind="causal-lm", layers="layers", entry="mlp",
                             gate="mlp.c_fc", down="mlp.c_proj", act="mlp.act"),
    # -- end of the dense families of issue 13 --
}


def adapter_for(model_type: str) -> MLPAdapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise InputError(
            f"model_type '{model_type}' is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None


def get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, value)


def layer_modules(model: nn.Module, adapter: MLPAdapter) -> list[nn.Module]:
    return list(get_path(model.base_model, adapter.layers))


@dataclass(frozen=True)
class MLPWeights:
    """One MLP in canonical layout, as views of the model's own parameters (no copies).

    h = act(x @ gate.T + b_gate) [* (x @ up.T + b_up)];  y = h @ down_t + b_down
    """
    gate: torch.Tensor             # [d_ff, d]
    up: torch.Tensor | None        # [d_ff, d] (GLU) or None
    down_t: torch.Tensor           # [d_ff, d_out]: row j is neuron j's output direction
    act: nn.Module
    b_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None

    @property
    def d_ff(self) -> int:
        return self.gate.shape[0]


def _linear(module: nn.Module, conv1d: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight as [out, in] and bias, for nn.Linear or GPT-2's Conv1D ([in, out])."""
    w = module.weight.t() if conv1d else module.weight
    return w, getattr(module, "bias", None)


def mlp_weights(resolve: Callable[[str], nn.Module], adapter: MLPAdapter,
                expert: int | None = None) -> MLPWeights:
    """Canonical weights of one layer's MLP (of one expert, for MoE).

    `resolve(path)` finds a submodule of the layer by its adapter path; for an unwrapped layer
    that is `lambda p: get_path(layer, p)`, and the sparse wrapper passes its own.
    """
    act = resolve(adapter.act)
    if adapter.is_moe:
        experts = resolve(adapter.experts)
        d_ff = experts.down_proj.shape[-1]
        gu = experts.gate_up_proj[expert]                      # [2*d_ff, d]
        return MLPWeights(gate=gu[:d_ff], up=gu[d_ff:], down_t=experts.down_proj[expert].t(), act=act)
    down_w, b_down = _linear(resolve(adapter.down), adapter.conv1d)
    if adapter.gate_up is not None:
        gu, b = _linear(resolve(adapter.gate_up), adapter.conv1d)
        d_ff = gu.shape[0] // 2
        return MLPWeights(gate=gu[:d_ff], up=gu[d_ff:], down_t=down_w.t(), act=act,
                          b_gate=None if b is None else b[:d_ff], b_up=None if b is None else b[d_ff:],
                          b_down=b_down)
    gate, b_gate = _linear(resolve(adapter.gate), adapter.conv1d)
    up, b_up = (None, None) if adapter.up is None else _linear(resolve(adapter.up), adapter.conv1d)
    return MLPWeights(gate=gate, up=up, down_t=down_w.t(), act=act, b_gate=b_gate, b_up=b_up, b_down=b_down)
