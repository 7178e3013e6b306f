"""Attribution through a sparsified MLP, with captum: which input tokens drive the output, dense vs
sparse, and how much of the dense model's neuron attribution falls on neurons the sparse model
dropped ("attribution mass lost").

- Token attribution: LayerIntegratedGradients on the input embeddings (with its convergence
  delta), or LayerGradientXActivation on them (InputXGradient at the embedding layer, the fast
  option). Target: the logit of one next token for causal LMs (default: the dense model's top
  token); for encoders, the cosine of the mean-pooled embedding to the dense model's embedding.
- Under sparsity the selection is FROZEN at the one the sparse model made on the real input: along
  the integration path (and for the gradients) every token keeps the neurons it used, so the
  sparse function explained is smooth and IG's completeness holds. (Recomputing the selection at
  every step would make the function jump where the chosen set changes, and the gradient would
  not see the jumps.) MoE layers keep routing and choosing per step: only dense MLPs are frozen.
- Neuron attribution: LayerGradientXActivation on every MLP's activation h (SparseMLP.neurons);
  not for MoE models yet (each expert sees a different subset of the tokens).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

from models import InputError, LoadedModel
from sparse_ops import LayerFiring, Policy, Recorder, install, sparsified
from sparse_ops.policy import selection_mask

from .analysis import Outputs, Progress, encode_prompt, forward, sentence_embedding
from .spec import RunSpec

METHODS = ("ig", "ixg")
MAX_STEPS = 300


@dataclass
class Attribution:
    tokens: list[str]
    method: str
    target: dict                       # {"kind": "logit", "token": str, "id": int} or {"kind": "cosine"}
    dense: list[float]                 # one attribution per token
    sparse: list[float]
    delta_dense: float | None          # IG convergence delta (None for ixg)
    delta_sparse: float | None
    f_dense: tuple[float, float]       # (f(input), f(baseline))
    f_sparse: tuple[float, float]
    mass_lost: list[float]             # per layer (empty for MoE models: see neuron attribution below)
    neurons_dense: list[torch.Tensor]  # per layer [n_neurons]: sum over tokens of the neuron attribution
    neurons_sparse: list[torch.Tensor]
    kept: list[torch.Tensor]           # per layer [n_neurons] int: tokens for which the sparse model computed it
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "method": self.method, "target": self.target, "dense": self.dense,
                "sparse": self.sparse, "delta_dense": self.delta_dense, "delta_sparse": self.delta_sparse,
                "mass_lost": self.mass_lost}


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


def _target_fn(loaded: LoadedModel, enc: dict, target_id: int | None, reference: torch.Tensor | None):
    mask = enc["attention_mask"]

    def f(input_ids: torch.Tensor) -> torch.Tensor:             # [B, T] -> [B]
        out = loaded.model(input_ids=input_ids, attention_mask=mask.expand(input_ids.shape[0], -1))
        if target_id is not None:
            return out.logits[:, -1, target_id]
        emb = sentence_embedding(Outputs((out.last_hidden_state,), None), mask.expand(input_ids.shape[0], -1))
        return emb @ reference
    return f


def attribute(loaded: LoadedModel, spec: RunSpec, method: str = "ig", steps: int = 50,
              target_id: int | None = None, progress: Progress | None = None) -> Attribution:
    step = progress or (lambda frac, text: None)
    if method not in METHODS:
        raise InputError(f"unknown attribution method '{str(method)[:20]}'; choose one of {', '.join(METHODS)}")
    if not isinstance(steps, int) or not 2 <= steps <= MAX_STEPS:
        raise InputError(f"steps must be a whole number from 2 to {MAX_STEPS}")
    t0 = time.perf_counter()
    enc = encode_prompt(loaded, spec.prompt)
    ids, n = enc["input_ids"], enc["input_ids"].shape[1]
    step(0.05, "dense pass and the sparse model's selection")
    dense_out = forward(loaded, enc)
    reference = None
    if loaded.kind == "causal-lm":
        target_id = int(dense_out.logits[0, -1].argmax()) if target_id is None else int(target_id)
        if not 0 <= target_id < dense_out.logits.shape[-1]:
            raise InputError(f"target token id {target_id} is outside the vocabulary")
        target = {"kind": "logit", "id": target_id, "token": loaded.token_strings(torch.tensor([target_id]))[0]}
    else:
        reference = sentence_embedding(dense_out, enc["attention_mask"])[0]
        target_id, target = None, {"kind": "cosine"}
    rec = Recorder()
    policy = spec.to_policy()
    with sparsified(loaded, policy, kernel=spec.kernel, recorder=rec):
        forward(loaded, enc)
    sparse_layers = rec.layers(n, loaded.d_ff * max(1, loaded.n_experts))
    frozen = None if policy.kind == "dense" or loaded.n_experts else {
        i: lf.padded_ids() for i, lf in enumerate(sparse_layers)}
    fn = _target_fn(loaded, enc, target_id, reference)
    baseline = _baseline(loaded, ids)
    emb_layer = loaded.model.get_input_embeddings()

    def tokens_and_neurons(frac: float, label: str, pol: Policy, frz):
        step(frac, f"{label}: token attribution ({method}, {steps} steps)" if method == "ig" else label)
        with sparsified(loaded, pol, kernel=spec.kernel, frozen=frz), torch.no_grad():
            fx, fb = float(fn(ids)[0]), float(fn(baseline)[0])
        with sparsified(loaded, pol, kernel=spec.kernel, frozen=frz):
            if method == "ig":
                attr, delta = LayerIntegratedGradients(fn, emb_layer).attribute(
                    ids, baselines=baseline, n_steps=steps, internal_batch_size=min(steps, 32),
                    return_convergence_delta=True)
                delta = float(delta[0])
            else:
                attr, delta = LayerGradientXActivation(fn, emb_layer).attribute(ids), None
        per_token = attr[0].sum(-1).detach()                                       # [T]
        if loaded.n_experts:         # experts see subsets of the tokens: no per-position h to expose
            return per_token, delta, (fx, fb), []
        step(frac + 0.2, f"{label}: neuron attribution")
        with sparsified(loaded, pol, kernel=spec.kernel, frozen=frz, seq_len=n):
            neuron = LayerGradientXActivation(fn, [m.neurons for m in install(loaded)]).attribute(ids)
        return per_token, delta, (fx, fb), [a[0].detach() for a in neuron]         # [T, d_ff] each

    full = Policy("topk", 1.0)                     # every neuron, through the exposed path: equals dense
    d_tok, d_delta, d_f, d_neur = tokens_and_neurons(0.1, "dense model", full, None)
    s_tok, s_delta, s_f, s_neur = tokens_and_neurons(0.55, "sparse model", policy, frozen)
    step(1.0, "done")
    selected = [_selected_mask(lf, n, loaded.d_ff) for lf in sparse_layers] if d_neur else []
    return Attribution(
        tokens=loaded.token_strings(ids[0]), method=method, target=target,
        dense=d_tok.tolist(), sparse=s_tok.tolist(), delta_dense=d_delta, delta_sparse=s_delta,
        f_dense=d_f, f_sparse=s_f,
        mass_lost=[_mass_lost(a, sel) for a, sel in zip(d_neur, selected)],
        neurons_dense=[a.sum(0) for a in d_neur], neurons_sparse=[a.sum(0) for a in s_neur],
        kept=[sel.sum(0) for sel in selected],
        timings_ms={"total": round((time.perf_counter() - t0) * 1000, 1)},
    )


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
