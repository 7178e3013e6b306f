"""Declarative adapters: where each architecture family keeps its MLP, and how its weights are laid out.

In the spirit of TransformerLens' per-family adapter files: an adapter only *describes* the model
(which submodule is gate / up / down, whether weights are stored [in, out]); it holds no kernels
and knows nothing about sparsity. Adapters are looked up by `config.model_type`.

Paths are dotted attribute paths. `layers` is relative to `model.base_model`; every other path is
relative to one decoder / encoder layer.

Mixture-of-experts models add an `MoE` description: the router (and how to read what it returns:
`route` normalises every convention to one), the routed experts' bank (`Experts`: stacked, halves or
interleaved, transposed, biases, a clamped SwiGLU) and the shared experts. A layer that has no
router is a dense MLP described by the adapter's own fields, so one adapter covers models whose
layers differ in kind. `mlp_weights` gives every MLP unit (dense MLP, routed or shared expert) in
one canonical layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import InputError


@dataclass(frozen=True)
class Experts:
    """A bank of routed experts stored stacked over the expert axis (one parameter for all experts).

    gate_up_proj is [E, 2*d_ff, d] and down_proj [E, d, d_ff] (x @ W.T), or with `transposed`
    [E, d, 2*d_ff] and [E, d_ff, d] (x @ W). Gate and up are the two halves of gate_up_proj, or
    alternate (g0, u0, g1, u1 ...) when `interleaved`.
    """
    path: str                             # the module holding the stacked weights, relative to a layer
    act: str | None = "act_fn"            # its activation submodule (None: `clamp` describes it)
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False                    # gate_up_proj_bias [E, 2*d_ff] and down_proj_bias [E, d]
    clamp: tuple[str, str] | None = None  # (limit, alpha) attribute names of a clamped SwiGLU:
                                          # h = g*sigmoid(alpha*g) * (clamp(u, -limit, limit) + 1), g = min(gate, limit)


@dataclass(frozen=True)
class SharedExpert:
    """An MLP of an MoE layer that every token goes through, beside the routed experts (paths
    relative to a layer). Its neurons are MLP neurons like any other: the policy applies to them."""
    gate: str
    up: str
    down: str
    act: str
    scale: str | None = None              # Linear(d, 1): sigmoid(scale(x)) multiplies its output


@dataclass(frozen=True)
class MoE:
    """A mixture-of-experts layer: a router picks experts per token, and shared experts (if any)
    run for every token. A layer of the model without `router` is a dense MLP described by the
    adapter's own gate / up / down / act (DeepSeek's first layers, Llama 4's interleaved ones)."""
    router: str                           # relative to a layer
    experts: Experts
    shared: tuple[SharedExpert, ...] = ()
    returns: str = "logits-weights-ids"   # what the router returns: (logits, top-k weights, top-k ids),
                                          # or "scores-logits": ([N, E] weights, 0 off the top-k; logits)
    probs: str = "softmax"                # the router's distribution over experts: softmax or sigmoid of logits
    weight_input: bool = False            # the routing weight scales the expert's input, not its output
    returns_pair: bool = False            # the block returns (y, router output), not y


@dataclass(frozen=True)
class Proj:
    """One linear projection of a block, for the whole-model scope (DESIGN.md): y = W x (+ b).

    `name` is what users see (q, k, v, qkv, o, gate, up, gate_up, down; DeepSeek's MLA: q_a, q_b,
    kv_a, kv_b); `path` is the module, relative to a layer (nn.Linear, or GPT-2's Conv1D when the
    adapter says conv1d); projections with the same `group` read the same input tensor (q, k and v;
    gate and up), so a policy that depends only on x keeps the same entries for all of them.
    `optional`: the family builds this module only under some configs (DeepSeek-V3's q_proj when
    q_lora_rank is None, q_a_proj and q_b_proj otherwise); a layer without it skips it."""
    name: str
    path: str
    group: str
    optional: bool = False


def _attn(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj") -> tuple[Proj, ...]:
    return (Proj("q", q, "attn_in"), Proj("k", k, "attn_in"), Proj("v", v, "attn_in"), Proj("o", o, "attn_out"))


def _glu_mlp(prefix="mlp") -> tuple[Proj, ...]:
    return (Proj("gate", f"{prefix}.gate_proj", "mlp_in"), Proj("up", f"{prefix}.up_proj", "mlp_in"),
            Proj("down", f"{prefix}.down_proj", "h"))


def _fused_attn(qkv: str, o: str) -> tuple[Proj, ...]:
    """One projection computes q, k and v together (GPT-2's c_attn, Pythia's query_key_value, Phi-3's qkv_proj)."""
    return Proj("qkv", qkv, "attn_in"), Proj("o", o, "attn_out")


def _mlp(w_in: str, w_out: str) -> tuple[Proj, ...]:
    """A plain MLP: h = act(W_in x); its W_in is named `up` (the GLU's gate has no counterpart)."""
    return Proj("up", w_in, "mlp_in"), Proj("down", w_out, "h")


# DeepSeek-V3's multi-head latent attention: q from x directly (q_proj) or through a low rank (q_a_proj,
# a norm, q_b_proj); keys and values through a shared low rank (kv_a_proj_with_mqa, a norm, kv_b_proj).
# q_proj, q_a_proj and kv_a_proj_with_mqa read the block's x; q_b_proj and kv_b_proj read normed latents.
_MLA = (Proj("q", "self_attn.q_proj", "attn_in", optional=True),
        Proj("q_a", "self_attn.q_a_proj", "attn_in", optional=True),
        Proj("q_b", "self_attn.q_b_proj", "q_latent", optional=True),
        Proj("kv_a", "self_attn.kv_a_proj_with_mqa", "attn_in"),
        Proj("kv_b", "self_attn.kv_b_proj", "kv_latent"),
        Proj("o", "self_attn.o_proj", "attn_out"))


@dataclass(frozen=True)
class MLPAdapter:
    family: str
    kind: str                      # "causal-lm" | "encoder"
    layers: str                    # ModuleList of blocks, relative to model.base_model
    entry: str                     # the module that a sparse wrapper replaces (computes the whole MLP)
    act: str | None = None         # activation module (dense MLP)
    down: str | None = None        # output projection (dense MLP)
    gate: str | None = None        # projection that goes through `act` (GLU gate, or W_in when not GLU)
    up: str | None = None          # GLU up projection (None: not GLU)
    gate_up: str | None = None     # fused [gate; up] projection (Phi-3), gate first
    tail: tuple[str, ...] = ()     # modules after `entry` that belong to the MLP (OPT, BERT)
    conv1d: bool = False           # weights stored [in, out] (GPT-2 Conv1D)
    moe: MoE | None = None         # mixture of experts (layers with its router); the fields above then
                                   # describe the model's dense layers, if it has any
    projections: tuple[Proj, ...] | None = None   # every linear projection of a block, for scope `all`
                                   # (attention, and the dense MLP's); None: not declared, so scope
                                   # `all` is refused for the family. MoE experts' projections are
                                   # the units that `moe` describes (named gate, up, down). A router
                                   # (and a shared expert's scale) is not a projection: it stays dense.

    @property
    def is_moe(self) -> bool:
        return self.moe is not None


_GLU = dict(kind="causal-lm", layers="layers", entry="mlp", gate="mlp.gate_proj",
            up="mlp.up_proj", down="mlp.down_proj", act="mlp.act_fn")
_FUSED = Experts("mlp.experts")


def _moe(router: str = "mlp.gate", experts: Experts = _FUSED, **kw) -> dict:
    return dict(family="moe", kind="causal-lm", layers="layers", entry=router.split(".")[0],
                moe=MoE(router=router, experts=experts, **kw))


def _shared(prefix: str, act: str = "act_fn", scale: str | None = None) -> SharedExpert:
    return SharedExpert(gate=f"{prefix}.gate_proj", up=f"{prefix}.up_proj", down=f"{prefix}.down_proj",
                        act=f"{prefix}.{act}", scale=scale)


ADAPTERS: dict[str, MLPAdapter] = {
    **{t: MLPAdapter(family="glu", **_GLU, projections=_attn() + _glu_mlp())
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo")},
    "phi3": MLPAdapter(family="glu", kind="causal-lm", layers="layers", entry="mlp",
                       gate_up="mlp.gate_up_proj", down="mlp.down_proj", act="mlp.activation_fn",
                       projections=_fused_attn("self_attn.qkv_proj", "self_attn.o_proj")
                       + (Proj("gate_up", "mlp.gate_up_proj", "mlp_in"), Proj("down", "mlp.down_proj", "h"))),
    "gpt2": MLPAdapter(family="gpt2", kind="causal-lm", layers="h", entry="mlp", gate="mlp.c_fc",
                       down="mlp.c_proj", act="mlp.act", conv1d=True,
                       projections=_fused_attn("attn.c_attn", "attn.c_proj") + _mlp("mlp.c_fc", "mlp.c_proj")),
    "opt": MLPAdapter(family="opt", kind="causal-lm", layers="decoder.layers", entry="fc1",
                      gate="fc1", down="fc2", act="activation_fn", tail=("activation_fn", "fc2"),
                      projections=_attn(o="self_attn.out_proj") + _mlp("fc1", "fc2")),
    "bert": MLPAdapter(family="bert", kind="encoder", layers="encoder.layer", entry="intermediate",
                       gate="intermediate.dense", down="output.dense",
                       act="intermediate.intermediate_act_fn", tail=("output.dense",),
                       projections=_attn("attention.self.query", "attention.self.key", "attention.self.value",
                                         "attention.output.dense") + _mlp("intermediate.dense", "output.dense")),
    # -- dense families of 2024-2026 (issue 13, part A); tiny-config tests in tests/test_families.py --
    # Gemma 3 (sliding and global layers, scaled embedding), OLMo 2/3 (norms after the MLP) and SmolLM3
    # differ from Llama outside the MLP only, which the wrappers leave as shipped.
    **{t: MLPAdapter(family="glu", **_GLU, projections=_attn() + _glu_mlp())
       for t in ("gemma3_text", "olmo2", "olmo3", "smollm3")},
    # Pythia (attention and MLP in parallel from one residual) and StarCoder2: Linear with bias, GELU.
    "gpt_neox": MLPAdapter(family="mlp", kind="causal-lm", layers="layers", entry="mlp",
                           gate="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h", act="mlp.act",
                           projections=_fused_attn("attention.query_key_value", "attention.dense")
                           + _mlp("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
    "starcoder2": MLPAdapter(family="mlp", kind="causal-lm", layers="layers", entry="mlp",
                             gate="mlp.c_fc", down="mlp.c_proj", act="mlp.act",
                             projections=_attn() + _mlp("mlp.c_fc", "mlp.c_proj")),
    # -- end of the dense families of issue 13 --
}
# MoE families. Routed experts: `experts`; shared experts: `shared`; dense layers: the GLU fields.
ADAPTERS |= {
    **{t: MLPAdapter(**_moe(), projections=_attn()) for t in ("mixtral", "qwen3_moe", "olmoe")},
    "qwen2_moe": MLPAdapter(**_moe(shared=(_shared("mlp.shared_expert", scale="mlp.shared_expert_gate"),)),
                            projections=_attn()),
    "deepseek_v3": MLPAdapter(**_GLU | _moe(shared=(_shared("mlp.shared_experts"),), probs="sigmoid"),
                              projections=_MLA + _glu_mlp()),
    "gpt_oss": MLPAdapter(**_moe("mlp.router", Experts("mlp.experts", act=None, transposed=True, interleaved=True,
                                                       bias=True, clamp=("limit", "alpha")), returns_pair=True),
                          projections=_attn()),
    "llama4_text": MLPAdapter(**_moe("feed_forward.router", Experts("feed_forward.experts", transposed=True),
                                     shared=(_shared("feed_forward.shared_expert", "activation_fn"),),
                                     returns="scores-logits", probs="sigmoid", weight_input=True,
                                     returns_pair=True)
                              | dict(layers="model.layers", gate="feed_forward.gate_proj",
                                     up="feed_forward.up_proj", down="feed_forward.down_proj",
                                     act="feed_forward.activation_fn", projections=_attn() + _glu_mlp("feed_forward"))),
    "granitemoe": MLPAdapter(**_moe("block_sparse_moe.router", Experts("block_sparse_moe.experts")),
                             projections=_attn()),
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

    h = act(x @ gate.T + b_gate) [* up_act(x @ up.T + b_up)];  y = h @ down_t + b_down
    """
    gate: torch.Tensor             # [d_ff, d]
    up: torch.Tensor | None        # [d_ff, d] (GLU) or None
    down_t: torch.Tensor           # [d_ff, d_out]: row j is neuron j's output direction
    act: nn.Module
    b_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None
    up_act: nn.Module | None = None    # applied to the up projection (a clamped SwiGLU); None: identity

    @property
    def d_ff(self) -> int:
        return self.gate.shape[0]


class ClampedSwish(nn.Module):
    """The gate side of a clamped SwiGLU: g = min(x, limit); g * sigmoid(alpha * g)."""

    def __init__(self, limit: float, alpha: float):
        super().__init__()
        self.limit, self.alpha = float(limit), float(alpha)

    def forward(self, x):
        g = x.clamp(max=self.limit)
        return g * torch.sigmoid(g * self.alpha)


class ClampedShift(nn.Module):
    """The up side of a clamped SwiGLU: clamp(x, -limit, limit) + 1."""

    def __init__(self, limit: float):
        super().__init__()
        self.limit = float(limit)

    def forward(self, x):
        return x.clamp(min=-self.limit, max=self.limit) + 1


def _linear(module: nn.Module, conv1d: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight as [out, in] and bias, for nn.Linear or GPT-2's Conv1D ([in, out])."""
    w = module.weight.t() if conv1d else module.weight
    return w, getattr(module, "bias", None)


def has_path(root: nn.Module, path: str) -> bool:
    try:
        get_path(root, path)
    except AttributeError:
        return False
    return True


def n_routed(resolve: Callable[[str], nn.Module], moe: MoE) -> tuple[int, int]:
    """(experts, neurons per expert) of an MoE layer's routed bank."""
    down = resolve(moe.experts.path).down_proj                 # [E, d, d_ff] or [E, d_ff, d] (transposed)
    return down.shape[0], down.shape[1 if moe.experts.transposed else 2]


def mlp_weights(resolve: Callable[[str], nn.Module], adapter: MLPAdapter,
                expert: int | None = None) -> MLPWeights:
    """Canonical weights of one MLP unit of a layer: the dense MLP (expert None), routed expert
    `expert` < E, or shared expert `expert - E` of an MoE layer.

    `resolve(path)` finds a submodule of the layer by its adapter path; for an unwrapped layer
    that is `lambda p: get_path(layer, p)`, and the sparse wrapper passes its own.
    """
    if expert is not None:
        n_experts, _ = n_routed(resolve, adapter.moe)
        if expert < n_experts:
            return _expert_weights(resolve(adapter.moe.experts.path), adapter.moe.experts, expert, resolve)
        s = adapter.moe.shared[expert - n_experts]
        return _glu_weights(resolve, s.gate, s.up, s.down, s.act, False)
    act = resolve(adapter.act)
    if adapter.gate_up is not None:
        down_w, b_down = _linear(resolve(adapter.down), adapter.conv1d)
        gu, b = _linear(resolve(adapter.gate_up), adapter.conv1d)
        d_ff = gu.shape[0] // 2
        return MLPWeights(gate=gu[:d_ff], up=gu[d_ff:], down_t=down_w.t(), act=act,
                          b_gate=None if b is None else b[:d_ff], b_up=None if b is None else b[d_ff:],
                          b_down=b_down)
    return _glu_weights(resolve, adapter.gate, adapter.up, adapter.down, adapter.act, adapter.conv1d)


def _glu_weights(resolve, gate: str, up: str | None, down: str, act: str, conv1d: bool) -> MLPWeights:
    down_w, b_down = _linear(resolve(down), conv1d)
    gate_w, b_gate = _linear(resolve(gate), conv1d)
    up_w, b_up = (None, None) if up is None else _linear(resolve(up), conv1d)
    return MLPWeights(gate=gate_w, up=up_w, down_t=down_w.t(), act=resolve(act), b_gate=b_gate, b_up=b_up,
                      b_down=b_down)


def _expert_weights(bank: nn.Module, spec: Experts, e: int, resolve) -> MLPWeights:
    gu, down = bank.gate_up_proj[e], bank.down_proj[e]
    gu, down_t = (gu.t(), down) if spec.transposed else (gu, down.t())      # [2*d_ff, d], [d_ff, d]
    b = bank.gate_up_proj_bias[e] if spec.bias else None

    def split(t):
        if t is None:
            return None, None
        half = t.shape[0] // 2
        return (t[0::2], t[1::2]) if spec.interleaved else (t[:half], t[half:])

    (gate, up), (b_gate, b_up) = split(gu), split(b)
    if spec.clamp is not None:
        limit, alpha = (getattr(bank, name) for name in spec.clamp)
        act, up_act = ClampedSwish(limit, alpha), ClampedShift(limit)
    else:
        act, up_act = resolve(f"{spec.path}.{spec.act}"), None
    return MLPWeights(gate=gate, up=up, down_t=down_t, act=act, b_gate=b_gate, b_up=b_up,
                      b_down=bank.down_proj_bias[e] if spec.bias else None, up_act=up_act)


@dataclass(frozen=True)
class Routing:
    """What a router chose, in one convention for every family."""
    probs: torch.Tensor            # [N, E] the router's distribution over experts (rows sum to 1)
    weights: torch.Tensor          # [N, top_k] weight of each picked expert
    experts: torch.Tensor          # [N, top_k] int64 picked experts


def route(router: nn.Module, x: torch.Tensor, moe: MoE) -> Routing:
    """Call the model's own router on x [N, d] and normalise what it returns (see MoE.returns, .probs)."""
    out = router(x)
    if moe.returns == "scores-logits":
        scores, logits = out
        experts = torch.topk(logits, router.top_k, dim=-1).indices   # the same call the router makes
        weights = scores.gather(1, experts)
    else:
        logits, weights, experts = out
    logits = logits.float()
    if moe.probs == "sigmoid":
        p = torch.sigmoid(logits)
        probs = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
    else:
        probs = torch.softmax(logits, dim=-1)
    return Routing(probs=probs, weights=weights, experts=experts.long())


def mlp_projections(adapter: MLPAdapter) -> dict[str, Proj]:
    """The declared projections of the dense MLP by their role in MLPWeights: gate (the projection
    through `act`: a GLU's gate, a plain MLP's W_in, or Phi-3's fused gate_up), up (GLU) and down.
    Empty when the family declares no projections; a role without a declared projection is left out
    (the caller refuses such a family for scope `all`)."""
    by_path = {p.path: p for p in adapter.projections or ()}
    roles = {"gate": adapter.gate_up or adapter.gate, "up": adapter.gate_up or adapter.up, "down": adapter.down}
    return {role: by_path[path] for role, path in roles.items() if path in by_path}
