"""The map step of a corpus profile: one shard of token windows -> a stats.Partial.

`ShardMapper(spec, settings)` loads the model once and is then called on many shards (so a Ray
actor can hold one, as in Ray Data's batch inference). Per shard it runs one dense pass, whose
recorder tap hands every MLP's h to accumulate.ShardStats (oracle firing, histograms, examples);
for `dense` and `topk` the policy's selection is read off that same pass (topk's selection IS the
oracle), any other policy runs a second pass under sparse_ops.sparsified and its tap counts what
the policy selected, against the oracle of the h of that pass (as the app's firing maps measure
recall). The taps take the sparse MLPs' recorder calls (sam_viz.sparse_ops.recorder.Recorder's `add`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from sam_viz.models import InputError, load_model
from sam_viz.sparse_ops import POLICIES, Policy, available_kernels, default_kernel, install, parse_density, sparsified
from sam_viz.sparse_ops.policy import selection_mask

from ..spec import positive_int
from .accumulate import ShardStats
from .corpus import Shard
from .stats import Layout, Partial

BATCH = 16                                   # windows per forward pass
MAX_TOKENS_CAP = 10 ** 10


@dataclass(frozen=True)
class ProfileSettings:
    """What a profile measures; validated here (CLI flags are untrusted input)."""
    policy: str = "topk"
    density: float = 0.1
    context: int = 128
    max_tokens: int | None = None
    kernel: str | None = None
    scope: str = "mlp"                   # see sam_viz.sparse_ops.policy
    allocation: str = "greedy"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise InputError(f"unknown policy '{str(self.policy)[:40]}'; choose one of {', '.join(POLICIES)}")
        object.__setattr__(self, "density", parse_density(self.density))
        self.run_policy                  # scope, allocation, and the policy under the scope
        object.__setattr__(self, "context", positive_int(self.context, "context"))
        kernel = self.kernel or default_kernel()
        if kernel not in available_kernels():
            raise InputError(f"unknown kernel '{str(kernel)[:40]}'; available here: {', '.join(available_kernels())}")
        object.__setattr__(self, "kernel", kernel)
        if self.max_tokens is not None:
            n = positive_int(self.max_tokens, "max-tokens")
            if not self.context <= n <= MAX_TOKENS_CAP:
                raise InputError(f"max-tokens must be between the context ({self.context}) and {MAX_TOKENS_CAP:,}, "
                                 f"got {n}")
            object.__setattr__(self, "max_tokens", n)

    @property
    def run_policy(self) -> Policy:
        return Policy(self.policy, self.density, scope=self.scope, allocation=self.allocation)

    def to_json(self) -> dict:
        """The settings; scope and allocation only under scope all, so a scope-mlp profile keeps its id."""
        out = asdict(self)
        if self.scope == "mlp":
            del out["scope"], out["allocation"]
        return out


def model_layout(loaded) -> Layout:
    return Layout(loaded.n_layers, loaded.n_neurons, loaded.n_experts)


class _DenseTap:
    """Recorder for the dense pass: every MLP call's h -> ShardStats (and topk / dense selections)."""
    wants_activations = True

    def __init__(self, stats: ShardStats, density: float, relu: list[bool], policy: str, base: int):
        self.stats, self.density, self.relu, self.policy, self.base = stats, density, relu, policy, base

    def add(self, layer, rows, ids, values, h_all, offset=0, oracle_k=None, width=None):
        k = Policy("topk", self.density).k(h_all.shape[-1])          # per unit: experts may differ in width
        self.stats.observe(layer, rows.cpu() + self.base, h_all, offset, k, self.relu[layer], self.policy)

    def add_routing(self, layer, experts, weights, probs):
        self.stats.observe_routing(layer, experts, probs)


class _PolicyTap:
    """Recorder for the policy's pass: its selection on each MLP call -> ShardStats."""
    wants_activations = True

    def __init__(self, stats: ShardStats, density: float, base: int):
        self.stats, self.density, self.base = stats, density, base

    def add(self, layer, rows, ids, values, h_all, offset=0, oracle_k=None, width=None):
        selected = None if ids is None else selection_mask(torch.where(ids >= 0, ids - offset, -1), h_all.shape[-1])
        k = Policy("topk", self.density).k(h_all.shape[-1])
        self.stats.observe_policy(layer, rows.cpu() + self.base, selected, h_all, offset, k)

    def add_routing(self, layer, experts, weights, probs):
        """Routing is counted once, in the dense pass."""


class ShardMapper:
    """Holds the loaded model; `mapper(shard)` -> the shard's stats.Partial."""

    def __init__(self, spec: str, settings: ProfileSettings, loaded=None):
        self.settings = settings
        self.loaded = loaded if loaded is not None else load_model(spec)
        self.layout = model_layout(self.loaded)
        wrappers = install(self.loaded)
        self.relu = [isinstance(w.weights(0 if w.moe else None).act, nn.ReLU) for w in wrappers]
        self.device = next(self.loaded.model.parameters()).device

    def __call__(self, shard: Shard) -> Partial:
        stats = ShardStats(self.layout, shard.doc, shard.pos)
        s, width = self.settings, shard.ids.shape[1]
        for b in range(0, shard.ids.shape[0], BATCH):
            ids = torch.from_numpy(np.ascontiguousarray(shard.ids[b:b + BATCH])).to(self.device)
            tap = _DenseTap(stats, s.density, self.relu, s.policy, b * width)
            with sparsified(self.loaded, Policy("dense"), recorder=tap), torch.no_grad():
                self.loaded.model.base_model(input_ids=ids)
            if s.policy not in ("topk", "dense"):
                with sparsified(self.loaded, s.run_policy, kernel=s.kernel,
                                recorder=_PolicyTap(stats, s.density, b * width)), torch.no_grad():
                    self.loaded.model.base_model(input_ids=ids)
        stats.p.layer_tokens += shard.tokens
        return stats.partial()
