"""analyze(loaded, spec): the prompt through the dense model and its sparse twin, side by side.

The sparse pass records, per layer and per token, the neurons it computed (a FiringTrace of
sparse_ops.LayerFiring); the comparison follows the metrics of DESIGN.md: KL(dense || sparse) and
top-1 agreement of next-token distributions for causal LMs, cosine of mean-pooled embeddings for
encoders, and the max abs difference of the last hidden state for both.
"""
from __future__ import annotations

import re
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from sam_viz.models import InputError, LoadedModel
from sam_viz.models.adapters import mlp_projections
from sam_viz.sparse_ops import (InputRecorder, LayerFiring, Policy, ProjectionInputs, Recorder, attention_weights,
                                sparsified)
from sam_viz.sparse_ops.inputs import model_density

from .cost import input_cost, mlp_cost, mlp_scope_model_density
from .spec import RunSpec


@dataclass
class Outputs:
    hidden_states: tuple[torch.Tensor, ...]   # n_layers + 1 of [1, T, d]
    logits: torch.Tensor | None               # [1, T, vocab] for causal LMs

    @property
    def last_hidden(self) -> torch.Tensor:
        return self.hidden_states[-1]


Progress = Callable[[float, str], None]
ACTIVATION_BUDGET = 32_000_000   # fp16 values of h kept per pass (T * neurons * layers); 64 MB
INPUT_MASK_BUDGET = 64 << 20     # bytes of packed kept-input masks per scope-all pass (T * d_in / 8 per projection)
TOP_NEXT = 10
MAX_SENTENCES = 16
DENSE_MEMO_SIZE = 8              # dense passes kept per model: a density or policy change reuses its prompt's
DENSE_MEMO_BYTES = 256 << 20     # and at most this many bytes of their tensors per model (a 7B model's
                                 # hidden states alone are ~280 MB at 512 tokens: such a pass is not kept)


@dataclass
class Analysis:
    """Plain data: everything the pages draw, serialisable without the model."""
    spec: RunSpec
    kind: str                                 # "causal-lm" | "encoder"
    model_type: str
    tokens: list[str]
    d_ff: int                                 # neurons per MLP (per routed expert for MoE)
    n_experts: int                            # 0 unless MoE
    layers: list[LayerFiring]                 # the sparse pass's firing trace, one per layer
    dense_layers: list[LayerFiring]           # the dense pass (ids None: every neuron fired)
    compare: dict[str, float]
    layer_divergence: list[float]             # ||h_sparse - h_dense|| / ||h_dense|| after each layer
    next_tokens: dict[str, list[dict]] | None = None    # causal LMs: top-10 at the last position
    sentence_cosines: list[dict] | None = None          # encoders: per sentence of the prompt
    continuation: dict | None = None                    # filled on request: greedy_continuation
    sweep: list[dict] | None = None                     # filled on request: density_sweep
    timings_ms: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] | None = None                # per token, see sam_viz.cost (predictor included)
    attributions: list = field(default_factory=list)    # sam_viz.attribution.Attribution results kept by the
                                                        # app; a saved run carries them (see sam_viz.store)
    n_shared: int = 0                                   # MoE: neuron ids after the routed E * d_ff (shared
                                                        # experts; models.LoadedModel.n_shared)
    model_density: float | None = None                  # share of the blocks' matrix weights read per token,
                                                        # embeddings excluded (scope mlp: attention dense)
    projections: list[dict[str, float]] | None = None   # per layer, {projection: share of its weights read};
                                                        # under scope all, its input density
    inputs: list[dict[str, ProjectionInputs]] | None = None   # scope all: per layer and projection, the kept
                                                        # input entries per token (not kept in saved runs yet)

    @property
    def n_neurons(self) -> int:
        """Neuron ids per layer (E * d_ff routed, then the shared experts', for MoE)."""
        return self.d_ff * max(1, self.n_experts) + self.n_shared

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def has_activations(self) -> bool:
        return all(l.activations is not None for l in self.layers + self.dense_layers)

    @property
    def density(self) -> float:
        """Fraction of all FFN neuron evaluations the sparse pass computed."""
        sel = sum(float(l.selected.sum()) for l in self.layers)
        pos = sum(float(l.possible.sum()) for l in self.layers)
        return sel / pos if pos else 1.0

    def trace_nbytes(self) -> int:
        """Bytes of the sparse firing trace (ids, values, per-token counts), without activations."""
        return sum(l.nbytes() - (l.activations.numel() * 2 if l.activations is not None else 0)
                   for l in self.layers)

    def to_json(self) -> dict:
        return {
            "model": self.spec.model, "policy": self.spec.policy, "target_density": self.spec.density,
            "scope": self.spec.scope, **({"allocation": self.spec.allocation} if self.spec.policy in ("teal", "wina")
                                         else {}),
            "kernel": self.spec.kernel, "tokens": self.tokens, "density": self.density,
            "model_density": self.model_density,
            "layers": [{"layer": i, "density": l.density, "mass_kept": l.mass_kept_share,
                        "recall": l.recall, "precision": l.precision,
                        "projections": self.projections[i] if self.projections else None}
                       for i, l in enumerate(self.layers)],
            "compare": self.compare,
        }


class TooManyTokens(InputError):
    """The prompt is over the model's token limit; `limit` says how many tokens would fit."""

    def __init__(self, n_tokens: int, loaded: LoadedModel):
        super().__init__(f"prompt is {n_tokens} tokens; the limit for {loaded.spec} is {loaded.max_tokens}")
        self.n_tokens, self.limit = n_tokens, loaded.max_tokens


class NoTokens(InputError):
    """The prompt has no token of its own for this tokenizer (only characters it drops, such as
    U+200B or U+202E): at most the special tokens the tokenizer adds to every text."""

    def __init__(self, loaded: LoadedModel):
        super().__init__(f"the prompt has no tokens for {loaded.spec}: its tokenizer drops every character "
                         "of it (invisible or control characters?); type some visible text")


def encode_prompt(loaded: LoadedModel, prompt: str) -> dict[str, torch.Tensor]:
    """[1, T] input ids and attention mask of a prompt; TooManyTokens over the model's limit, NoTokens
    when nothing but the tokenizer's own special tokens is left."""
    enc = loaded.encode(prompt)
    n = enc["input_ids"].shape[1]
    if n > loaded.max_tokens:
        raise TooManyTokens(n, loaded)
    if n <= loaded.encode("")["input_ids"].shape[1]:
        raise NoTokens(loaded)
    return enc


def truncate_to_tokens(loaded: LoadedModel, text: str, n: int) -> str:
    """The longest prefix of `text` ending where one of its tokens ends that encodes to at most n
    tokens (special tokens included); "" when not even the first token fits."""
    def fits(end: int) -> bool:
        return loaded.encode(text[:end])["input_ids"].shape[1] <= n

    if fits(len(text)):
        return text
    with loaded._tok_lock:                    # fast tokenizers are not safe to share across threads
        spans = loaded.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    ends = sorted({end for _, end in spans if end > 0})
    lo, hi = 0, len(ends)                     # ends[:lo] fit, ends[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if fits(ends[mid]) else (lo, mid)
    return text[:ends[lo - 1]] if lo else ""


def forward(loaded: LoadedModel, enc: dict[str, torch.Tensor]) -> Outputs:
    with torch.no_grad():
        out = loaded.model(**enc, output_hidden_states=True)
    return Outputs(hidden_states=tuple(out.hidden_states), logits=getattr(out, "logits", None))


def sentence_embedding(outputs: Outputs, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden state, as sentence-transformers' MiniLM does. [B, d]"""
    m = attention_mask[..., None].to(outputs.last_hidden.dtype)
    pooled = (outputs.last_hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


def compare_outputs(kind: str, dense: Outputs, sparse: Outputs, attention_mask: torch.Tensor) -> dict[str, float]:
    result = {}
    if kind == "causal-lm":
        logp_d = F.log_softmax(dense.logits[0].double(), dim=-1)        # [T, vocab]
        logp_s = F.log_softmax(sparse.logits[0].double(), dim=-1)
        kl = (logp_d.exp() * (logp_d - logp_s)).sum(-1)                # [T]
        result["kl"] = float(kl.mean().clamp(min=0.0))
        result["top1_agreement"] = float((logp_d.argmax(-1) == logp_s.argmax(-1)).double().mean())
    else:
        cos = (sentence_embedding(dense, attention_mask) * sentence_embedding(sparse, attention_mask)).sum(-1)
        result["cosine"] = float(cos.mean())
    result["max_abs_diff"] = float((dense.last_hidden - sparse.last_hidden).abs().max())
    return result


COMPARE_METRICS = {                  # compare_outputs' keys: (name on screen, format, what it measures)
    "kl": ("KL divergence", "{:.3g} nats", "Mean over the prompt's positions of KL(dense || sparse) between the "
           "two models' next-token distributions, in nats: 0 = the same distributions."),
    "top1_agreement": ("Top-1 agreement", "{:.1%}", "Share of the prompt's positions at which both models' most "
                       "likely next token is the same."),
    "cosine": ("Embedding cosine", "{:.4f}", "Cosine of the sparse model's mean-pooled sentence embedding to the "
               "dense model's: 1 = the same direction."),
    "max_abs_diff": ("Largest hidden-state difference", "{:.3g}", "The largest |dense - sparse| over every entry "
                     "of the last hidden state."),
}


def describe_compare(compare: dict[str, float]) -> list[tuple[str, str, str]]:
    """(name, value as text, what it measures) for each of an analysis' compare numbers, in order; a key
    without a description is shown by its own name, a value that is not finite as 'n/a'."""
    out = []
    for key, value in compare.items():
        name, fmt, help_text = COMPARE_METRICS.get(key, (key.replace("_", " "), "{:.4g}", ""))
        finite = isinstance(value, (int, float)) and value == value and abs(value) != float("inf")
        out.append((name, fmt.format(value) if finite else "n/a", help_text))
    return out


def divergence(dense: Outputs, sparse: Outputs) -> list[float]:
    out = []
    for hd, hs in zip(dense.hidden_states[1:], sparse.hidden_states[1:]):
        out.append(float((hs - hd).norm() / hd.norm().clamp(min=1e-12)))
    return out


def analyze(loaded: LoadedModel, spec: RunSpec, progress: Progress | None = None) -> Analysis:
    """Dense pass, sparse pass with capture, and their comparison, for one prompt."""
    step = progress or (lambda frac, text: None)
    t0 = time.perf_counter()
    enc = encode_prompt(loaded, spec.prompt)
    n_tokens = enc["input_ids"].shape[1]
    n_neurons = loaded.n_neurons
    keep = n_tokens * n_neurons * loaded.n_layers <= ACTIVATION_BUDGET
    t1 = time.perf_counter()
    step(0.1, "dense pass")
    dense, dense_layers = _dense_pass(loaded, enc, spec.prompt, keep)
    t2 = time.perf_counter()
    step(0.4, f"sparse pass ({spec.policy}, density {spec.density:g})")
    recorder = Recorder(keep_activations=keep)
    keep_masks = _mask_bytes(loaded, n_tokens) <= INPUT_MASK_BUDGET
    inputs = None if spec.scope == "mlp" else InputRecorder(keep_masks=keep_masks)
    calibrating = lambda frac, text: step(0.4, f"first use of {spec.policy} on this model: {text}")  # noqa: E731
    with sparsified(loaded, spec.to_policy(), kernel=spec.kernel, recorder=recorder, progress=calibrating,
                    inputs=inputs) as run:
        t3 = time.perf_counter()
        sparse = forward(loaded, enc)
    t4 = time.perf_counter()
    step(0.8, "comparing")
    analysis = Analysis(
        spec=spec, kind=loaded.kind, model_type=loaded.model_type,
        tokens=loaded.token_strings(enc["input_ids"][0]), d_ff=loaded.d_ff, n_experts=loaded.n_experts,
        n_shared=loaded.n_shared,
        layers=recorder.layers(n_tokens, n_neurons), dense_layers=dense_layers,
        compare=compare_outputs(loaded.kind, dense, sparse, enc["attention_mask"]),
        layer_divergence=divergence(dense, sparse),
    )
    analysis.cost = _cost(loaded, spec, analysis.layers, n_tokens, run.calibration)
    if inputs is not None:
        analysis.inputs = inputs.layers(n_tokens)
        analysis.projections = [{name: p.density for name, p in layer.items()} for layer in analysis.inputs]
        analysis.model_density = model_density(analysis.inputs)
        analysis.cost = input_cost(*inputs.weights(), n_tokens)
    else:
        analysis.projections, analysis.model_density = _mlp_scope_work(loaded, analysis.layers, n_tokens)
    if loaded.kind == "causal-lm":
        analysis.next_tokens = {name: top_next_tokens(loaded, out.logits[0, -1])
                                for name, out in (("dense", dense), ("sparse", sparse))}
    else:
        analysis.sentence_cosines = sentence_cosines(loaded, spec)
    t5 = time.perf_counter()
    ms = lambda a, b: round((b - a) * 1000, 2)  # noqa: E731
    analysis.timings_ms = {"tokenize": ms(t0, t1), "dense": ms(t1, t2), "calibrate": ms(t2, t3),
                           "sparse": ms(t3, t4), "compare": ms(t4, t5), "total": ms(t0, t5)}
    step(1.0, "done")
    return analysis


class _DenseMemo:
    """The dense pass of recent prompts, per model object, for a rerun that changes only the policy,
    density or kernel (the dense side is the same then). Keyed by the prompt and by every parameter's
    identity and in-place version counter, so a model whose weights were changed or replaced is run
    again; results are shared read-only between analyses."""

    def __init__(self):
        self._by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @staticmethod
    def key(loaded: LoadedModel, *parts) -> tuple:
        return (*parts, tuple((id(p), p._version) for p in loaded.model.parameters()))

    def get(self, loaded: LoadedModel, key: tuple):
        with self._lock:
            memo = self._by_model.get(loaded.model)
            if memo is None or key not in memo:
                return None
            memo.move_to_end(key)
            return memo[key][0]

    def put(self, loaded: LoadedModel, key: tuple, value) -> None:
        size = _nbytes(value)
        if size > DENSE_MEMO_BYTES:
            return
        with self._lock:
            memo = self._by_model.setdefault(loaded.model, OrderedDict())
            memo[key] = (value, size)
            while len(memo) > DENSE_MEMO_SIZE or sum(n for _, n in memo.values()) > DENSE_MEMO_BYTES:
                memo.popitem(last=False)


_DENSE = _DenseMemo()


def _nbytes(value) -> int:
    """Bytes of the tensors in a (nested) tuple or list of tensors, Outputs and LayerFiring."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, Outputs):
        return _nbytes(value.hidden_states) + _nbytes(value.logits)
    if isinstance(value, LayerFiring):
        return value.nbytes()
    return 0


def _dense_pass(loaded: LoadedModel, enc: dict, prompt: str, keep: bool) -> tuple[Outputs, list[LayerFiring]]:
    """The dense model's outputs and firing trace for this prompt (computed once per prompt)."""
    key = _DENSE.key(loaded, "prompt", prompt, keep)
    hit = _DENSE.get(loaded, key)
    if hit is None:
        rec = Recorder(keep_activations=keep)
        with sparsified(loaded, Policy("dense"), recorder=rec):
            out = forward(loaded, enc)
        n_tokens = enc["input_ids"].shape[1]
        hit = (out, rec.layers(n_tokens, loaded.n_neurons))
        _DENSE.put(loaded, key, hit)
    return hit


def _cost(loaded: LoadedModel, spec: RunSpec, layers: list[LayerFiring], n_tokens: int, calibration) -> dict:
    d_model = loaded.model.config.hidden_size
    params = calls = 0
    if calibration is not None and spec.policy == "predictor":
        params, calls = _predictor_params(loaded, calibration, layers, n_tokens), 1
    return mlp_cost(layers, spec.policy, d_model, _glu(loaded), n_tokens, params, calls)


def _glu(loaded: LoadedModel) -> bool:
    return loaded.adapter.up is not None or loaded.adapter.gate_up is not None or loaded.adapter.is_moe


def _mask_bytes(loaded: LoadedModel, n_tokens: int) -> int:
    """About the bytes of a scope-all pass's packed kept-input masks: per layer, q k v o and gate up
    read d_model-wide inputs, down reads the neurons."""
    return n_tokens * loaded.n_layers * (6 * loaded.model.config.hidden_size + loaded.n_neurons) // 8


def _mlp_scope_work(loaded: LoadedModel, layers: list[LayerFiring], n_tokens: int):
    """Scope mlp: (per layer {projection: share of its weights read}, model density): the attention
    projections read whole, the MLP's at the layer's neuron density. (None, None) when the family does
    not declare its projections."""
    attention = attention_weights(loaded)
    if attention is None:
        return None, None
    mlp_names = list(dict.fromkeys(p.name for p in mlp_projections(loaded.adapter).values()))
    shares = []
    for sizes, lf in zip(attention, layers):
        names = mlp_names if lf.experts is None else ["gate", "up", "down"]
        shares.append({name: 1.0 for name in sizes} | {name: lf.density for name in names})
    possible = sum(float(l.possible.sum()) for l in layers) / max(1, n_tokens)
    selected = sum(float(l.selected.sum()) for l in layers) / max(1, n_tokens)
    density = mlp_scope_model_density(sum(sum(s.values()) for s in attention), possible, selected,
                                      loaded.model.config.hidden_size, _glu(loaded))
    return shares, density


def _predictor_params(loaded: LoadedModel, calibration, layers: list[LayerFiring], n_tokens: int) -> float:
    """Predictor parameters read per token: one call of each unit's predictor for every token that
    unit computes (a dense MLP and a shared expert: every token; a routed expert: the tokens routed to it)."""
    total = 0
    for layer, expert in calibration.predictors:
        experts = layers[layer].experts
        routed = experts is not None and 0 <= expert < loaded.n_experts
        uses = int((experts == expert).sum()) if routed else n_tokens
        total += calibration.predictor_cost((layer, expert))[1] * uses
    return total / max(1, n_tokens)


def top_next_tokens(loaded: LoadedModel, logits: torch.Tensor, k: int = TOP_NEXT) -> list[dict]:
    probs = F.softmax(logits.double(), dim=-1)
    top = torch.topk(probs, k)
    names = loaded.token_strings(top.indices)
    return [{"token": n, "prob": float(p)} for n, p in zip(names, top.values)]


def split_sentences(text: str) -> list[str]:
    parts = [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", text) if p.strip()]
    return parts[:MAX_SENTENCES]


def sentence_cosines(loaded: LoadedModel, spec: RunSpec) -> list[dict]:
    """Encoders: cosine of each sentence's embedding, dense vs sparse (one padded batch each)."""
    sentences = split_sentences(spec.prompt)
    enc = loaded.encode_batch(sentences, max_length=loaded.max_tokens)
    key = _DENSE.key(loaded, "sentences", tuple(sentences))
    dense = _DENSE.get(loaded, key)
    if dense is None:
        dense = sentence_embedding(forward(loaded, enc), enc["attention_mask"])
        _DENSE.put(loaded, key, dense)
    with sparsified(loaded, spec.to_policy(), kernel=spec.kernel):
        sparse = sentence_embedding(forward(loaded, enc), enc["attention_mask"])
    cos = (dense * sparse).sum(-1)
    return [{"sentence": s, "cosine": float(c)} for s, c in zip(sentences, cos)]
