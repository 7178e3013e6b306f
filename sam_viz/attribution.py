"""Attribution through a sparsified MLP, with captum: which input tokens drive the output, dense vs
sparse, and how much of the dense model's neuron attribution falls on neurons the sparse model
dropped ("attribution mass lost").

- Token attribution: LayerIntegratedGradients on the input embeddings (with its convergence
  delta), or LayerGradientXActivation on them (InputXGradient at the embedding layer, the fast
  option). Target: the logit of one next token for causal LMs (default: the dense model's top
  token). For encoders, as in semantic search, the cosine of the prompt's mean-pooled embedding to
  the DENSE model's embedding of a second sentence, the query (a fixed vector). Default query: the
  prompt's first sentence when it has several (which words make the passage match its opening),
  else a fixed question. Not the dense embedding of the prompt itself: that cosine is at its
  maximum (1) at the input, so the dense gradient there is zero and the attributions are noise.
- Under sparsity the selection is FROZEN at the one the sparse model made on the real input: along
  the integration path (and for the gradients) every token keeps the neurons it used, so the
  sparse function explained is smooth and IG's completeness holds. (Recomputing the selection at
  every step would make the function jump where the chosen set changes, and the gradient would
  not see the jumps.) MoE layers keep routing and choosing per step: only dense MLPs are frozen.
- Convergence delta: captum's sum of attributions - (f(input) - f(baseline)), in float32. A delta
  of exactly 0 is float32 rounding, not an exact or linearised integral: on minilm (the app's
  default prompt, topk 0.5, 50 steps) the float32 deltas were 2.98e-06 dense and 0 sparse, and in
  float64 2.8e-06 and 1.5e-11 (10 steps: 1.1e-02 and -1.2e-03). The frozen sparse function is as
  non-linear, its integral along this path just converges faster, to below float32's spacing at
  |f| (1.5e-08). `delta_resolution` gives that spacing, and the page shows such a delta as below it.
- Neuron attribution: LayerGradientXActivation on every MLP's activation h (SparseMLP.neurons);
  not for MoE models yet (each expert sees a different subset of the tokens).
- Rounding noise: where the true gradient at the input is zero, the gradient autograd returns is
  what the cancellation at the output leaves, about eps * (the output gradient's size), carried
  back through the network: the n attribution terms are then about eps times those of a target of
  the same size with a gradient, whose L1 norm is at most sqrt(n) times their L2 norm, itself about
  |f| (the terms share out a change of f). Floor: sqrt(n) * eps(dtype) * |f|, |f| the larger of
  |f(input)|, |f(baseline)|; n = T * d_model for the token values, T * d_ff for one layer's neurons.
  Values whose L1 norm is at or below it are flagged as noise, and mass lost is None for such a
  layer. Measured (float32): zero-gradient attributions 45-80x under the floor on minilm (1e3x on
  tiny-bert), the weakest real ones (sparse tiny-bert next to its maximum) 17x over it, minilm's
  query targets over 1e4x.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from sam_viz.models import InputError, LoadedModel
from sam_viz.sparse_ops import LayerFiring, Policy, Recorder, install, sparsified
from sam_viz.sparse_ops.policy import selection_mask

from .analysis import Analysis, Outputs, Progress, encode_prompt, forward, sentence_embedding, split_sentences
from .spec import RunSpec

METHODS = ("ig", "ixg")
MAX_STEPS = 300
MAX_QUERY_CHARS = 2000
FALLBACK_QUERY = "What is this text about?"
KEEP = 8                       # attributions kept on one Analysis (and saved with it), least recent dropped


@dataclass
class Attribution:
    tokens: list[str]
    method: str
    steps: int | None                  # integration steps for ig, None for ixg
    target: dict                       # {"kind": "logit", "id": int, "token": str} or {"kind": "cosine", "query": str}
    dense: list[float]                 # one attribution per token
    sparse: list[float]
    delta_dense: float | None          # IG convergence delta (None for ixg)
    delta_sparse: float | None
    f_dense: tuple[float, float]       # (f(input), f(baseline))
    f_sparse: tuple[float, float]
    mass_lost: list[float | None]      # per layer, None where the dense neuron attribution is noise (empty for MoE)
    neurons_dense: list[torch.Tensor]  # per layer [n_neurons]: sum over tokens of the neuron attribution
    neurons_sparse: list[torch.Tensor]
    kept: list[torch.Tensor]           # per layer [n_neurons] int: tokens for which the sparse model computed it
    neuron_l1_dense: list[float]       # per layer: sum over tokens and neurons of |attribution|
    neuron_l1_sparse: list[float]
    floor_tokens: tuple[float, float]  # (dense, sparse): L1 of the token values at or below which they are noise
    floor_neurons: tuple[float, float]  # the same for one layer's neuron attributions
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> tuple:
        return attribution_key(self.method, self.steps, self.target.get("id"), self.target.get("query"))

    @property
    def delta_resolution(self) -> tuple[float, float]:
        """(dense, sparse): the spacing of float32 numbers at the larger of |f(input)|, |f(baseline)|.
        captum computes the delta in the output's dtype (float32: every model loads so), so a |delta|
        below it only says that the attributions' sum and f(input) - f(baseline) agree to every digit
        float32 keeps; a 0 is that, not an exact integral."""
        return tuple(float(np.spacing(np.float32(max(abs(x), abs(b))))) for x, b in (self.f_dense, self.f_sparse))

    @property
    def token_noise(self) -> tuple[bool, bool]:
        """(dense, sparse): the token values are within rounding noise of zero."""
        return (_l1(self.dense) <= self.floor_tokens[0], _l1(self.sparse) <= self.floor_tokens[1])

    @property
    def neuron_noise(self) -> list[tuple[bool, bool]]:
        """Per layer (dense, sparse): the neuron attributions are within rounding noise of zero."""
        return [(d <= self.floor_neurons[0], s <= self.floor_neurons[1])
                for d, s in zip(self.neuron_l1_dense, self.neuron_l1_sparse)]

    def to_json(self) -> dict:
        noise = self.token_noise
        layers = [{"layer": i, "mass_lost": lost, "neuron_l1_dense": d, "neuron_l1_sparse": s,
                   "noise_dense": nd, "noise_sparse": ns}
                  for i, (lost, d, s, (nd, ns)) in enumerate(zip(self.mass_lost, self.neuron_l1_dense,
                                                                  self.neuron_l1_sparse, self.neuron_noise))]
        return {"tokens": self.tokens, "method": self.method, "steps": self.steps, "target": self.target,
                "dense": self.dense, "sparse": self.sparse, "delta_dense": self.delta_dense,
                "delta_sparse": self.delta_sparse, "f_dense": list(self.f_dense), "f_sparse": list(self.f_sparse),
                "noise": {"tokens_dense": noise[0], "tokens_sparse": noise[1],
                          "floor_tokens": list(self.floor_tokens), "floor_neurons": list(self.floor_neurons)},
                "mass_lost": self.mass_lost, "layers": layers}


def attribution_key(method: str, steps: int | None, target_id: int | None, query: str | None) -> tuple:
    """What identifies an attribution of one analysis: method, steps (ig only), target."""
    return (method, int(steps) if method == "ig" else None, target_id, query)


def recall(analysis: Analysis, key: tuple) -> Attribution | None:
    """The attribution kept on the analysis under `key` (marked most recent), or None."""
    hit = next((a for a in analysis.attributions if a.key == key), None)
    if hit is not None:
        remember(analysis, hit)
    return hit


def remember(analysis: Analysis, result: Attribution) -> None:
    """Keep `result` on the analysis (a saved run carries it), at most KEEP, least recent dropped. A new
    list, never an edit in place: sessions share the cached analysis and may be saving it."""
    others = [a for a in analysis.attributions if a.key != result.key]
    analysis.attributions = others[max(0, len(others) - KEEP + 1):] + [result]


def default_query(prompt: str) -> str:
    """The prompt's first sentence when it has several, else a fixed question."""
    sentences = split_sentences(prompt)
    first = sentences[0] if len(sentences) > 1 else ""
    return first if 0 < len(first) <= MAX_QUERY_CHARS else FALLBACK_QUERY


def likely_targets(loaded: LoadedModel, spec: RunSpec, k: int = 10) -> list[dict]:
    """Causal LMs: the dense model's top-k next tokens, as target choices."""
    if loaded.kind != "causal-lm":
        return []
    enc = encode_prompt(loaded, spec.prompt)
    probs = F.softmax(forward(loaded, enc).logits[0, -1].double(), dim=-1)
    top = torch.topk(probs, k)
    names = loaded.token_strings(top.indices)
    return [{"token": n, "id": int(i), "prob": float(p)} for n, i, p in zip(names, top.indices, top.values)]


def _baseline(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """Every ordinary token replaced by the unknown token (else pad); special tokens ([CLS], [SEP],
    BOS) kept. Not pad first: its embedding is often all zeros, where RMSNorm is at its most
    non-linear and the integral converges badly."""
    tok = loaded.tokenizer
    neutral = next((i for i in (tok.unk_token_id, tok.pad_token_id) if i is not None), 0)
    return torch.where(loaded.special_tokens_mask(ids[0])[None], ids, torch.full_like(ids, neutral))


def _target(loaded: LoadedModel, enc: dict, target_id: int | None, query: str | None) -> tuple[dict, object]:
    """The target's description and f: input ids [B, T] -> [B]."""
    mask = enc["attention_mask"]
    if loaded.kind == "causal-lm":
        if query is not None:
            raise InputError("a query is for sentence encoders; a causal language model explains a next token")
        logits = forward(loaded, enc).logits[0, -1]                              # [vocab]
        target_id, reference = int(logits.argmax()) if target_id is None else int(target_id), None
        if not 0 <= target_id < logits.shape[-1]:
            raise InputError(f"target token id {target_id} is outside the vocabulary")
        target = {"kind": "logit", "id": target_id, "token": loaded.token_strings(torch.tensor([target_id]))[0]}
    else:
        if target_id is not None:
            raise InputError("a target token is for causal language models; an encoder explains a query's similarity")
        reference = _query_embedding(loaded, query)
        target = {"kind": "cosine", "query": query}

    def f(input_ids: torch.Tensor) -> torch.Tensor:                     # [B, T] -> [B]
        batch_mask = mask.expand(input_ids.shape[0], -1)
        out = loaded.model(input_ids=input_ids, attention_mask=batch_mask)
        if reference is None:
            return out.logits[:, -1, target_id]
        return sentence_embedding(Outputs((out.last_hidden_state,), None), batch_mask) @ reference
    return target, f


def _query_embedding(loaded: LoadedModel, query: str) -> torch.Tensor:
    """The dense model's unit embedding of the query [d]."""
    if not isinstance(query, str) or not query.strip():
        raise InputError("the query is empty; give a sentence to compare the prompt with")
    if len(query) > MAX_QUERY_CHARS:
        raise InputError(f"the query is {len(query):,} characters; the limit is {MAX_QUERY_CHARS:,}")
    enc = loaded.encode(query)
    if enc["input_ids"].shape[1] > loaded.max_tokens:
        raise InputError(f"the query is {enc['input_ids'].shape[1]} tokens; the limit is {loaded.max_tokens}")
    return sentence_embedding(forward(loaded, enc), enc["attention_mask"])[0]


@dataclass
class _Side:
    """One model's attributions: per token [T], delta, (f(input), f(baseline)), per layer [T, d_ff]."""
    tokens: torch.Tensor
    delta: float | None
    f: tuple[float, float]
    neurons: list[torch.Tensor]
    floor_tokens: float
    floor_neurons: float


def noise_floor(n_terms: int, f: tuple[float, float], dtype: torch.dtype) -> float:
    """L1 norm at or below which n_terms attribution terms are rounding noise (see the docstring)."""
    return math.sqrt(n_terms) * torch.finfo(dtype).eps * max(abs(f[0]), abs(f[1]))


def _side(loaded, kernel, fn, ids, method, steps, step, frac, label, pol, frozen) -> _Side:
    from captum.attr import LayerGradientXActivation, LayerIntegratedGradients   # ~0.5 s: only when attributing

    step(frac, f"{label}: token attribution ({method}, {steps} steps)" if method == "ig" else label)
    emb_layer, baseline, n = loaded.model.get_input_embeddings(), _baseline(loaded, ids), ids.shape[1]
    dtype = next(loaded.model.parameters()).dtype
    with sparsified(loaded, pol, kernel=kernel, frozen=frozen), torch.no_grad():
        f = (float(fn(ids)[0]), float(fn(baseline)[0]))
    with sparsified(loaded, pol, kernel=kernel, frozen=frozen):
        if method == "ig":
            attr, delta = LayerIntegratedGradients(fn, emb_layer).attribute(
                ids, baselines=baseline, n_steps=steps, internal_batch_size=min(steps, 32),
                return_convergence_delta=True)
            delta = float(delta[0])
        else:
            attr, delta = LayerGradientXActivation(fn, emb_layer).attribute(ids), None
    per_token = attr[0].sum(-1).detach()                                           # [T]
    floor_tokens = noise_floor(attr[0].numel(), f, dtype)
    neurons = []
    if not loaded.n_experts:          # experts see subsets of the tokens: no per-position h to expose
        step(frac + 0.2, f"{label}: neuron attribution")
        with sparsified(loaded, pol, kernel=kernel, frozen=frozen, seq_len=n):
            neurons = [a[0].detach() for a in LayerGradientXActivation(
                fn, [m.neurons for m in install(loaded)]).attribute(ids)]           # [T, d_ff] each
    return _Side(per_token, delta, f, neurons, floor_tokens, noise_floor(n * loaded.d_ff, f, dtype))


def attribute(loaded: LoadedModel, spec: RunSpec, method: str = "ig", steps: int = 50,
              target_id: int | None = None, query: str | None = None,
              progress: Progress | None = None) -> Attribution:
    """Token and neuron attribution of the target, dense and sparse. Encoders: `query` None means
    default_query(prompt)."""
    step = progress or (lambda frac, text: None)
    if method not in METHODS:
        raise InputError(f"unknown attribution method '{str(method)[:20]}'; choose one of {', '.join(METHODS)}")
    if not isinstance(steps, int) or not 2 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be a whole number from 2 to {MAX_STEPS}")
    t0 = time.perf_counter()
    enc = encode_prompt(loaded, spec.prompt)
    ids, n = enc["input_ids"], enc["input_ids"].shape[1]
    step(0.05, "dense pass and the sparse model's selection")
    if loaded.kind != "causal-lm" and query is None:
        query = default_query(spec.prompt)
    target, fn = _target(loaded, enc, target_id, query)
    rec = Recorder()
    policy = spec.to_policy()
    with sparsified(loaded, policy, kernel=spec.kernel, recorder=rec):
        forward(loaded, enc)
    sparse_layers = rec.layers(n, loaded.n_neurons)
    frozen = None if policy.kind == "dense" or loaded.n_experts or policy.scope == "all" else {   # scope all:
        i: lf.padded_ids() for i, lf in enumerate(sparse_layers)}        # the policy chooses at every point of the path
    args = (loaded, spec.kernel, fn, ids, method, steps, step)
    d = _side(*args, 0.1, "dense model", Policy("topk", 1.0), None)   # every neuron, exposed: equals dense
    exposed = Policy("topk", 1.0) if policy.kind == "dense" else policy      # dense: no neuron layer to hook
    s = _side(*args, 0.55, "sparse model", exposed, frozen)
    step(1.0, "done")
    selected = [_selected_mask(lf, n, loaded.d_ff) for lf in sparse_layers] if d.neurons else []
    l1_dense, l1_sparse = [float(a.abs().sum()) for a in d.neurons], [float(a.abs().sum()) for a in s.neurons]
    return Attribution(
        tokens=loaded.token_strings(ids[0]), method=method, steps=steps if method == "ig" else None,
        target=target, dense=d.tokens.tolist(), sparse=s.tokens.tolist(), delta_dense=d.delta,
        delta_sparse=s.delta, f_dense=d.f, f_sparse=s.f,
        mass_lost=[None if l1 <= d.floor_neurons else _mass_lost(a, sel)
                   for a, sel, l1 in zip(d.neurons, selected, l1_dense)],
        neurons_dense=[a.sum(0) for a in d.neurons], neurons_sparse=[a.sum(0) for a in s.neurons],
        kept=[sel.sum(0) for sel in selected], neuron_l1_dense=l1_dense, neuron_l1_sparse=l1_sparse,
        floor_tokens=(d.floor_tokens, s.floor_tokens), floor_neurons=(d.floor_neurons, s.floor_neurons),
        timings_ms={"total": round((time.perf_counter() - t0) * 1000, 1)},
    )


def delta_text(delta: float, resolution: float) -> str:
    """The delta as the page shows it: '< 1.5e-08' below float32's resolution, else '2.98e-06'."""
    return f"< {resolution:.1e}" if abs(delta) < resolution else f"{delta:.2e}"


def _l1(values: list[float]) -> float:
    return sum(abs(v) for v in values)


def _selected_mask(lf: LayerFiring, n_tokens: int, d_ff: int) -> torch.Tensor:
    """[T, d_ff] bool: neurons the sparse pass computed per token (all when dense)."""
    if lf.ids is None:
        return torch.ones(n_tokens, d_ff, dtype=torch.bool)
    return selection_mask(lf.padded_ids(), d_ff)


def _mass_lost(dense_attr: torch.Tensor, selected: torch.Tensor) -> float:
    """Share of sum |dense neuron attribution| on (token, neuron) pairs the sparse model dropped."""
    a = dense_attr.abs()
    total = float(a.sum())
    return float(a[~selected].sum()) / total if total > 0 else 0.0
