"""Held-out perplexity of a causal LM, dense or with sparse MLPs: `python -m sam_viz eval`.

The definition is tools/train_demo.py's `heldout_loss`, so the demo models' cards reproduce with
one command: the text is split into documents on `<|endoftext|>`, each document is tokenized with
the model's own special tokens (for the demo LMs: `<|endoftext|>` first, as in training), the
documents' tokens are concatenated and cut into non-overlapping windows of context + 1 tokens
(consecutive windows share one token), and perplexity = exp(mean next-token cross-entropy over all
windows' `context` targets). A text without the separator is one document: blank lines separate
paragraphs, not documents, and a special token in mid-text would change what is measured.
The sparse run is sparse_ops.sparsified; a DensityCounter (the recorder's light path: no ids, no
values, no oracle sort, no h of every neuron) counts the MLP neurons it computed, and under scope all an
InputRecorder without masks counts the matrix weights every projection read (`model_density`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from sam_viz.models import InputError, LoadedModel
from sam_viz.models.loading import DEMO_DIR
from sam_viz.sparse_ops import (POLICIES, InputRecorder, Policy, attention_weights, available_kernels, parse_density,
                                sparsified)
from sam_viz.sparse_ops.recorder import DensityCounter

from .cost import mlp_scope_model_density
from .files import decode_text, read_bytes
from .spec import positive_int

HELDOUT = DEMO_DIR / "heldout.txt"       # the demo LMs' test split (models/demo/README.md)
SEPARATOR = "<|endoftext|>"
CONTEXT = 128                            # the demo LMs' training context
BATCH = 16                               # windows per forward pass, as heldout_loss
MAX_TEXT_BYTES = 64 * 2**20

Progress = Callable[[int, int], None]    # (windows done, windows in all)


@dataclass(frozen=True)
class EvalSpec:
    """What `eval` measures; every field validated here (CLI flags are untrusted input)."""
    model: str = "demo-lm"
    policy: str = "dense"
    density: float = 1.0
    kernel: str = "reference"
    text: str | None = None              # a file path; None: the shipped held-out split
    max_tokens: int | None = None        # at most this many predicted tokens (whole windows)
    context: int = CONTEXT
    scope: str = "mlp"                   # see sam_viz.sparse_ops.policy
    allocation: str = "greedy"

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise InputError("model is empty; name a model spec")
        if self.policy not in POLICIES:
            raise InputError(f"unknown policy '{str(self.policy)[:40]}'; choose one of {', '.join(POLICIES)}")
        if self.kernel not in available_kernels():
            raise InputError(f"unknown kernel '{str(self.kernel)[:40]}'; available here: "
                             f"{', '.join(available_kernels())}")
        object.__setattr__(self, "density", self.policy_at(parse_density(self.density)).density)
        object.__setattr__(self, "context", positive_int(self.context, "context"))
        if self.max_tokens is not None:
            n = positive_int(self.max_tokens, "max-tokens")
            if n < self.context:
                raise InputError(f"max-tokens must be at least the context ({self.context} tokens): "
                                 "eval scores whole windows")
            object.__setattr__(self, "max_tokens", n)

    def policy_at(self, density: float) -> Policy:
        return Policy(self.policy, density, scope=self.scope, allocation=self.allocation)

    @property
    def max_windows(self) -> int | None:
        return None if self.max_tokens is None else self.max_tokens // self.context


@dataclass(frozen=True)
class Evaluation:
    spec: EvalSpec
    loss: float                          # mean next-token cross-entropy (nats)
    tokens: int                          # predicted tokens = windows * context
    windows: int
    mlp_density: float                   # share of MLP neuron evaluations computed, all layers and tokens
    neurons: tuple[int, int] = (0, 0)    # (MLP neurons computed, possible), summed over layers and tokens
    model_density: float | None = None   # share of the blocks' matrix weights read per token, embeddings
                                         # excluded (scope mlp: attention dense; None: projections undeclared)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_json(self) -> dict:
        s = self.spec
        return {"model": s.model, "policy": s.policy, "density": s.density, "kernel": s.kernel, "scope": s.scope,
                **({"allocation": s.allocation} if s.policy in ("teal", "wina") else {}),
                "text": s.text if s.text is not None else "heldout", "context": s.context,
                "windows": self.windows, "tokens": self.tokens, "loss": self.loss,
                "perplexity": self.perplexity, "mlp_density": self.mlp_density, "model_density": self.model_density}


def read_text(path: str | None) -> str:
    """The text to evaluate (None: the held-out split); one sentence for a file that is not text."""
    file = HELDOUT if path is None else Path(path).expanduser()
    name = str(file) if path is None else path
    text = decode_text(read_bytes(file, "text file", name, MAX_TEXT_BYTES), "text file", name)
    if not text.strip():
        raise InputError(f"text file '{name}' is empty")
    return text


def documents(text: str) -> list[str]:
    """The documents of a text joined by SEPARATOR (whitespace-only ones dropped)."""
    return [d for d in text.split(SEPARATOR) if d.strip()]


def text_tokens(loaded: LoadedModel, docs: list[str], limit: int | None = None) -> torch.Tensor:
    """[N] the documents' tokens, each with the model's special tokens, concatenated; with `limit`,
    documents stop once there are at least `limit` tokens (the windows of a prefix are unchanged)."""
    parts, n = [], 0
    for doc in docs:
        parts.append(loaded.encode(doc)["input_ids"][0])
        n += parts[-1].numel()
        if limit is not None and n >= limit:
            break
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def windows(tokens: torch.Tensor, context: int) -> torch.Tensor:
    """[N] -> [W, context + 1]: non-overlapping inputs of `context` tokens, each with its next token."""
    n = (tokens.numel() - 1) // context
    return tokens[(torch.arange(n) * context)[:, None] + torch.arange(context + 1)]


def evaluate(loaded: LoadedModel, spec: EvalSpec, text: str | None = None,
             progress: Progress | None = None, calibrating: Callable[[float, str], None] | None = None) -> Evaluation:
    """Perplexity of `loaded` on `text` (default: read spec.text) with spec's MLP policy."""
    if loaded.kind != "causal-lm":
        raise InputError(f"eval measures next-token perplexity; {spec.model} is an encoder")
    if spec.context > loaded.max_tokens:
        raise InputError(f"context {spec.context} is over {spec.model}'s limit of {loaded.max_tokens} tokens")
    text = read_text(spec.text) if text is None else text
    need = None if spec.max_windows is None else spec.max_windows * spec.context + 1
    tokens = text_tokens(loaded, documents(text), need)
    if tokens.numel() <= spec.context:
        raise InputError(f"the text is {tokens.numel()} tokens for {spec.model}; eval needs at least "
                         f"{spec.context + 1} (a window of {spec.context} and the next token)")
    wins = windows(tokens, spec.context)[:spec.max_windows]
    loss_sum, (selected, possible), (read, total) = _score(loaded, spec.policy_at(spec.density), spec.kernel,
                                                           wins, progress, calibrating)
    n = wins[:, 1:].numel()
    if spec.scope == "all":
        model = read / total if total else 1.0
    else:
        attention = attention_weights(loaded)
        model = None if attention is None else mlp_scope_model_density(
            sum(sum(a.values()) for a in attention), possible / n, selected / n, loaded.model.config.hidden_size,
            loaded.adapter.up is not None or loaded.adapter.gate_up is not None or loaded.adapter.is_moe)
    return Evaluation(spec=spec, loss=loss_sum / n, tokens=n, windows=len(wins),
                      mlp_density=selected / possible if possible else 1.0, neurons=(selected, possible),
                      model_density=model)


def _score(loaded: LoadedModel, policy: Policy, kernel: str, wins: torch.Tensor, progress, calibrating):
    """(sum of next-token losses over wins [W, T + 1], (MLP neurons computed, possible), (matrix weights read,
    possible) under scope all), BATCH windows at a time."""
    loss_sum, selected, possible, read, total = 0.0, 0, 0, 0, 0
    for i in range(0, len(wins), BATCH):
        batch, recorder = wins[i:i + BATCH], DensityCounter(loaded.d_ff)
        inputs = InputRecorder() if policy.scope == "all" else None
        with sparsified(loaded, policy, kernel=kernel, recorder=recorder, progress=calibrating,
                        inputs=inputs), torch.no_grad():
            logits = loaded.model(input_ids=batch[:, :-1]).logits                    # [B, T, V]
        if inputs is not None:
            batch_read, batch_total = inputs.weights()
            read, total = read + batch_read, total + batch_total
        loss_sum += float(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"))
        for layer_selected, layer_possible in recorder.counts().values():
            selected, possible = selected + layer_selected, possible + layer_possible
        if progress is not None:
            progress(min(i + BATCH, len(wins)), len(wins))
    return loss_sum, (selected, possible), (read, total)
