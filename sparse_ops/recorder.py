"""Captures, per layer and per token, which neurons the sparse pass computed and their values.

Stored compactly as CSR rows (one row per token): neuron ids as int16 (int32 when a layer has more
than 32767 neurons), activation values as fp16. For MoE layers a neuron id is
`expert * d_ff + j` for a routed expert and `E * d_ff + (earlier shared experts' neurons) + j` for a
shared one, and the router's choice per token is kept too. `possible` counts, per token, the
neurons of the units the dense model computes for it (picked and shared experts; README).

DensityCounter is the light alternative for a long text (`eval`): per layer, only how many neurons
were computed and how many could have been; no ids, values, mass or oracle recall, and the MLPs do
not compute every neuron's h for it (`wants_activations` is False).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from .policy import selection_mask

_FP16_MAX = 65504.0


@dataclass
class LayerFiring:
    """One layer of a firing trace. T = number of tokens."""
    indptr: torch.Tensor              # [T + 1] int32: token t's neurons are ids[indptr[t]:indptr[t+1]]
    ids: torch.Tensor | None          # [nnz] int16/int32, None when every neuron fired (dense policy)
    values: torch.Tensor | None       # [nnz] fp16 activation h_j of each fired neuron
    selected: torch.Tensor            # [T] int32: neurons computed per token
    possible: torch.Tensor            # [T] int32: neurons the dense model computes per token
    mass_kept: torch.Tensor           # [T] float32: sum abs(h) over selected neurons
    mass_total: torch.Tensor          # [T] float32: sum abs(h) over all neurons
    experts: torch.Tensor | None = None         # [T, top_k] int16 (MoE)
    expert_weights: torch.Tensor | None = None  # [T, top_k] fp16 (MoE)
    activations: torch.Tensor | None = None     # [T, n_neurons] fp16 h of every neuron (kept on request;
                                                # MoE: 0 for experts the router did not pick)
    router_entropy: torch.Tensor | None = None  # [T] float32: entropy (nats) of the router's distribution (MoE)
    oracle: torch.Tensor | None = None          # [T] int32: size of the oracle top-k set at the run's density
    hits: torch.Tensor | None = None            # [T] int32: selected neurons that are in the oracle set

    @property
    def recall(self) -> float | None:
        """Share of the oracle top-k neurons the policy selected (None when not measured)."""
        if self.oracle is None:
            return None
        return float(self.hits.sum()) / max(1, float(self.oracle.sum()))

    @property
    def precision(self) -> float | None:
        """Share of the selected neurons that are in the oracle top-k (None when not measured)."""
        if self.hits is None:
            return None
        return float(self.hits.sum()) / max(1, float(self.selected.sum()))

    @property
    def density(self) -> float:
        return float(self.selected.sum()) / max(1, float(self.possible.sum()))

    @property
    def mass_kept_share(self) -> float:
        total = float(self.mass_total.sum())
        return float(self.mass_kept.sum()) / total if total > 0 else 1.0

    def token(self, t: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(ids, values) of token t, or None when every neuron fired."""
        if self.ids is None:
            return None
        a, b = int(self.indptr[t]), int(self.indptr[t + 1])
        return self.ids[a:b], self.values[a:b]

    def padded_ids(self) -> torch.Tensor:
        """[T, k_max] int64 neuron ids per token, -1 padded (the kernels' index layout)."""
        counts = (self.indptr[1:] - self.indptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(counts.numel()), counts)
        pos = torch.arange(rows.numel()) - (torch.cumsum(counts, 0) - counts)[rows]
        idx = torch.full((counts.numel(), int(counts.max()) if counts.numel() else 0), -1, dtype=torch.long)
        idx[rows, pos] = self.ids.long()
        return idx

    def nbytes(self) -> int:
        parts = [self.indptr, self.ids, self.values, self.selected, self.possible, self.mass_kept,
                 self.mass_total, self.experts, self.expert_weights, self.activations, self.oracle, self.hits,
                 self.router_entropy]
        return sum(p.numel() * p.element_size() for p in parts if p is not None)


@dataclass
class _Part:
    rows: torch.Tensor                # [n] token positions
    ids: torch.Tensor | None          # [n, k] global neuron ids, -1 = none; None = all neurons
    values: torch.Tensor | None       # [n, k]
    possible: int                     # neurons possible per row
    mass_total: torch.Tensor          # [n]
    offset: int = 0                   # first global neuron id of this part (expert * d_ff)
    h: torch.Tensor | None = None     # [n, d_ff] fp16, when activations are kept
    oracle: torch.Tensor | None = None  # [n] oracle top-k size
    hits: torch.Tensor | None = None    # [n] selected neurons in the oracle set


@dataclass
class Recorder:
    """Filled by the sparse MLPs during one forward pass of one sequence; read with `layers()`.

    keep_activations: also keep h of every neuron (fp16), for heatmaps and mass-kept curves.
    """
    keep_activations: bool = False
    wants_activations = True          # the MLPs pass every neuron's h to add() (mass, recall)
    _parts: dict[int, list[_Part]] = field(default_factory=dict)
    _routing: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, layer: int, rows, ids, values, h_all, offset: int = 0, oracle_k: int | None = None,
            width: int | None = None) -> None:
        """rows [n]; ids/values [n, k] global ids (-1 = none; None: all neurons fired); h_all [n, d_ff]
        every neuron's h (its width is the unit's d_ff). With oracle_k, also count how many selected
        ids are in the top-oracle_k by |h|."""
        h_all = h_all.detach()
        oracle = hits = None
        if oracle_k is not None and ids is not None:
            top = torch.sort(h_all.abs(), dim=-1, descending=True, stable=True).indices[:, :oracle_k]
            in_oracle = torch.zeros_like(h_all, dtype=torch.bool).scatter_(1, top, True)      # [n, d_ff]
            picked = selection_mask(torch.where(ids >= 0, ids - offset, -1), h_all.shape[-1])
            hits = (picked & in_oracle).sum(-1).int()                                        # [n]
            oracle = torch.full_like(hits, oracle_k)
        part = _Part(rows.detach(), None if ids is None else ids.detach(),
                     None if values is None else values.detach().float(), h_all.shape[-1],
                     h_all.abs().sum(-1).float(), offset,
                     _to_fp16(h_all) if self.keep_activations else None, oracle, hits)
        with self._lock:
            self._parts.setdefault(layer, []).append(part)

    def add_routing(self, layer: int, experts: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor) -> None:
        """experts, weights [T, top_k]; probs [T, E] the router's distribution (sam_viz.models.adapters.route)."""
        p = probs.detach().float()
        entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)                  # 0 log 0 = 0
        with self._lock:
            self._routing[layer] = (experts.detach().to(torch.int16), weights.detach().to(torch.float16), entropy)

    def layers(self, n_tokens: int, n_neurons: int) -> list[LayerFiring]:
        """One LayerFiring per recorded layer, in layer order. n_neurons: ids per layer (E * d_ff for MoE)."""
        id_dtype = torch.int16 if n_neurons <= torch.iinfo(torch.int16).max else torch.int32
        out = []
        for layer in sorted(self._parts):
            firing = _assemble(self._parts[layer], n_tokens, id_dtype)
            parts = self._parts[layer]
            if all(p.oracle is not None for p in parts):
                firing.oracle = _per_token([p.oracle for p in parts], parts, n_tokens)
                firing.hits = _per_token([p.hits for p in parts], parts, n_tokens)
            if self.keep_activations:
                firing.activations = torch.zeros(n_tokens, n_neurons, dtype=torch.float16)
                for p in self._parts[layer]:
                    firing.activations[p.rows, p.offset:p.offset + p.possible] = p.h
            if layer in self._routing:
                firing.experts, firing.expert_weights, firing.router_entropy = self._routing[layer]
            out.append(firing)
        return out


def _assemble(parts: list[_Part], n: int, id_dtype) -> LayerFiring:
    possible = torch.zeros(n, dtype=torch.int64)
    mass_total = torch.zeros(n)
    for p in parts:
        possible.index_add_(0, p.rows, torch.full_like(p.rows, p.possible))
        mass_total.index_add_(0, p.rows, p.mass_total)
    if any(p.ids is None for p in parts):          # dense: every neuron fired, nothing to list
        return LayerFiring(indptr=torch.zeros(n + 1, dtype=torch.int32), ids=None, values=None,
                           selected=possible.int(), possible=possible.int(), mass_kept=mass_total.clone(),
                           mass_total=mass_total)
    rows, ids, vals = [], [], []
    for p in parts:
        valid = p.ids >= 0
        rows.append(p.rows[:, None].expand_as(p.ids)[valid])
        ids.append(p.ids[valid])
        vals.append(p.values[valid])
    rows, ids, vals = torch.cat(rows), torch.cat(ids), torch.cat(vals)
    order = torch.sort(rows, stable=True).indices
    rows, ids, vals = rows[order], ids[order], vals[order]
    counts = torch.bincount(rows, minlength=n)
    mass_kept = torch.zeros(n).index_add_(0, rows, vals.abs())
    indptr = torch.zeros(n + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    return LayerFiring(indptr=indptr.int(), ids=ids.to(id_dtype),
                       values=_to_fp16(vals), selected=counts.int(),
                       possible=possible.int(), mass_kept=mass_kept, mass_total=mass_total)


def _per_token(values: list[torch.Tensor], parts: list[_Part], n: int) -> torch.Tensor:
    out = torch.zeros(n, dtype=torch.int64)
    for v, p in zip(values, parts):
        out.index_add_(0, p.rows, v.long())
    return out.int()


def _to_fp16(t: torch.Tensor) -> torch.Tensor:
    return t.float().clamp(-_FP16_MAX, _FP16_MAX).half()


@dataclass
class DensityCounter:
    """Counts, per layer, the neurons the sparse pass computed and those the dense model computes
    (d_ff per token, per picked or shared expert for MoE). Takes add() / add_routing() calls as a Recorder."""
    d_ff: int
    wants_activations = False         # the MLPs pass h_all=None: nothing here reads h
    _counts: dict[int, list[int]] = field(default_factory=dict)     # layer -> [selected, possible]
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, layer: int, rows, ids, values=None, h_all=None, offset: int = 0, oracle_k: int | None = None,
            width: int | None = None) -> None:
        """rows [n]; ids [n, k] (-1 = none) or None when every neuron of the unit (`width` neurons;
        None: d_ff) fired."""
        possible = rows.numel() * (width or self.d_ff)
        selected = possible if ids is None else int((ids >= 0).sum())
        with self._lock:
            counts = self._counts.setdefault(layer, [0, 0])
            counts[0] += selected
            counts[1] += possible

    def add_routing(self, layer: int, experts, weights, probs) -> None:
        """The router's choice is not counted (only the neurons of the experts it picked are)."""

    def counts(self) -> dict[int, tuple[int, int]]:
        """{layer: (neurons computed, neurons possible)} summed over every token recorded."""
        return {layer: (c[0], c[1]) for layer, c in sorted(self._counts.items())}
