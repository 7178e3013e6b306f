"""SparseMLP: a wrapper installed once in place of each MLP, keeping the original inside.

Outside a sparse run it calls the original modules, so the model computes exactly as shipped.
Inside one (see `sparsified`), it selects neurons with the run's policy and computes
y = W_down[:, S] h_S (+ bias) with the run's kernel, as Deja Vu / CATS / TEAL do. Architecture
details come from the declarative adapter; no family names here.

An MoE layer is a set of MLP units: the routed experts the router picked for a token (unit e < E,
weighted as the router says) and the shared experts every token goes through (unit E + s). The
policy applies to every unit alike, with k = round(density * the unit's d_ff); a token's density
is the share of its units' neurons computed (README, "Density in MoE models"). A layer of an MoE
model without the router is a plain MLP (unit -1).

Under scope `all` (sam_viz.sparse_ops.inputs) each unit's projections read only the kept entries of their
inputs: gate and up of x, down of the neurons h, each through `inputs.project`; the neurons the down
projection reads are the ones recorded as fired. The router stays dense.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from sam_viz.models import LoadedModel, MLPAdapter, MLPWeights, get_path, mlp_weights
from sam_viz.models.adapters import mlp_projections, n_routed, route, set_path

from .context import Run, current_run
from .inputs import NormCache, keep_mask, project
from .kernels import activations
from .policy import mask_indices, selection_mask, topk_indices

_INSTALL_LOCK = threading.Lock()


class Absorbed(nn.Module):
    """Stands where a module of the MLP chain was (OPT's fc2, BERT's output.dense): the
    SparseMLP before it already computed the whole MLP, so this passes its input through."""

    def forward(self, x):
        return x


class SparseMLP(nn.Module):
    def __init__(self, layer: int, adapter: MLPAdapter, dense: nn.Module, tail: list[nn.Module]):
        super().__init__()
        self.layer = layer
        self.adapter = adapter
        self.dense = dense                   # the original module, as shipped
        self.tail = nn.ModuleList(tail)      # originals of the absorbed modules, in call order
        self.neurons = nn.Identity()         # h [B, T, d_ff] passes here when a run exposes it (attribution)
        moe = adapter.moe if adapter.is_moe and self._has(adapter.moe.router) else None
        self.moe = moe                       # None: a dense MLP (also inside an MoE model)
        self.n_experts, self.d_expert = n_routed(self.resolve, moe) if moe else (0, 0)
        self.offsets = {-1: 0, **self._unit_offsets()} if moe else {-1: 0}   # unit -> its first neuron id
        dense_names = {role: p.name for role, p in mlp_projections(adapter).items()}
        self.names = {-1: dense_names, "expert": {"gate": "gate", "up": "up", "down": "down"}}   # scope all
        self.norms = NormCache()                                                     # wina's column norms

    def extra_repr(self) -> str:
        return f"layer={self.layer}, family={self.adapter.family}"

    def resolve(self, path: str) -> nn.Module:
        """A submodule by its adapter path (relative to the layer), wherever it now lives."""
        for root, module in ((self.adapter.entry, self.dense), *zip(self.adapter.tail, self.tail)):
            if path == root:
                return module
            if path.startswith(root + "."):
                return get_path(module, path[len(root) + 1:])
        raise KeyError(f"adapter path '{path}' is not part of the MLP at '{self.adapter.entry}'")

    def _has(self, path: str) -> bool:
        try:
            self.resolve(path)
        except (KeyError, AttributeError):
            return False
        return True

    def _unit_offsets(self) -> dict[int, int]:
        """Routed expert e: e * d_ff; shared expert s (unit E + s): after all routed ids, in order."""
        out = {e: e * self.d_expert for e in range(self.n_experts)}
        start = self.n_experts * self.d_expert
        for s in range(len(self.moe.shared)):
            out[self.n_experts + s] = start
            start += self.weights(self.n_experts + s).d_ff
        return out

    def weights(self, expert: int | None = None) -> MLPWeights:
        return mlp_weights(self.resolve, self.adapter, expert)

    def _weights(self, run: Run, expert: int = -1) -> MLPWeights:
        """weights(), resolved once per run: a decoder calls every layer at every step, under one run."""
        w = run.weights.get((self, expert))
        if w is None:
            w = run.weights[(self, expert)] = self.weights(None if expert < 0 else expert)
        return w

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x)
        for module in self.tail:
            y = module(y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = current_run()
        if run is None:
            return self.dense_forward(x)
        x2 = x.reshape(-1, x.shape[-1])                                 # [N, d]
        if run.policy.kind == "dense" and run.policy.scope == "mlp":
            if run.recorder is None and run.collector is None:
                return self.dense_forward(x)
            if self.moe is None and (run.collector is not None or run.recorder.wants_activations):
                return self._dense_recorded(run, x2).reshape(*x.shape[:-1], -1)
            y = self.dense_forward(x)
            self._record_dense(run, x2, _positions(x2))
            return y
        if self.moe is not None:
            y, extra = self._moe(run, x2, _positions(x2))
        else:
            y, extra = self._sparse(run, x2, None, self._weights(run)), None
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return (y, extra) if self.moe is not None and self.moe.returns_pair else y

    def _dense_recorded(self, run: Run, x2: torch.Tensor) -> torch.Tensor:
        """A dense MLP whose h is recorded: h computed once from the canonical weights, recorded,
        and projected down (y = W_down h + b, the ops the shipped modules run, so the same bits;
        tests/test_sparsity.py) instead of running the shipped modules and computing h again."""
        w = self._weights(run)
        h = activations(x2, w)                                           # [N, d_ff]
        self._record_h(run, -1, _positions(x2), x2, h, w)
        return F.linear(h, w.down_t.t(), w.b_down)                       # [N, d_out]

    def _record_h(self, run: Run, e: int, rows: torch.Tensor, xe: torch.Tensor, h: torch.Tensor | None,
                  w: MLPWeights) -> None:
        if run.recorder is not None:
            run.recorder.add(self.layer, rows, None, None, h, offset=self.offsets[e], width=w.d_ff)
        if run.collector is not None:                          # calibration: real tokens only
            real = run.token_mask[rows] if run.token_mask is not None else slice(None)
            run.collector.add((self.layer, e), xe[real], h[real])

    def _record_dense(self, run: Run, x2: torch.Tensor, rows: torch.Tensor) -> None:
        units = self._units(run, x2)[0] if self.moe is not None else [(-1, rows, x2, None)]
        need_h = run.collector is not None or run.recorder.wants_activations
        for e, tok, xe, _ in units:
            w = self._weights(run, e)
            self._record_h(run, e, rows[tok], xe, activations(xe, w) if need_h else None, w)

    def _units(self, run: Run, x2: torch.Tensor):
        """Route as shipped and record the routing. Returns ([(unit, token rows, unit input, output
        scale [n, 1] or None)] for each picked routed expert then each shared one, the Routing)."""
        router = self.resolve(self.moe.router)
        r = route(router, x2, self.moe)                                  # [N, E], [N, top_k], [N, top_k]
        if run.recorder is not None:
            run.recorder.add_routing(self.layer, r.experts, r.weights, r.probs)
        units = []
        for e in r.experts.unique().tolist():
            tok, pos = torch.where(r.experts == e)
            weight = r.weights[tok, pos, None].to(x2.dtype)
            if self.moe.weight_input:
                units.append((e, tok, x2[tok] * weight, None))
            else:
                units.append((e, tok, x2[tok], weight))
        everyone = _positions(x2)
        for s, shared in enumerate(self.moe.shared):
            scale = None if shared.scale is None else torch.sigmoid(self.resolve(shared.scale)(x2))
            units.append((self.n_experts + s, everyone, x2, scale))
        return units, r

    def _sparse(self, run: Run, x2: torch.Tensor, rows: torch.Tensor | None, w: MLPWeights,
                expert: int = -1) -> torch.Tensor:
        """One MLP (or one expert) on tokens x2 [n, d] at positions `rows` (None: 0 .. n-1, made
        only when something reads them, not on a plain decode step)."""
        if run.policy.scope == "all":
            return self._sparse_inputs(run, x2, rows, w, expert)
        policy, h_all, n, k = run.policy, None, x2.shape[0], run.policy.k(w.d_ff)
        if rows is None and (run.frozen is not None or run.recorder is not None or policy.kind == "threshold"):
            rows = _positions(x2)
        if run.frozen is not None and expert < 0:                       # the selection made earlier
            frozen = run.frozen[self.layer]                              # [T, k] by token position
            idx = frozen[rows % frozen.shape[0]]
        elif policy.is_full:
            idx = torch.arange(w.d_ff, device=x2.device).expand(n, w.d_ff)
        elif policy.kind == "topk":
            h_all = activations(x2, w)                                   # oracle: needs all of h
            idx = topk_indices(h_all, k)                                 # [n, k]
        elif policy.kind == "threshold":                                 # CATS score
            score = w.act(F.linear(x2, w.gate, w.b_gate)).abs()          # [n, d_ff]
            idx = mask_indices(score > run.threshold(self.layer, score, rows))
        elif policy.kind == "predictor":                                 # before any MLP weight is read
            scores = run.calibration.scores((self.layer, expert), x2)    # [n, d_ff]
            idx = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
        else:                                                            # static: one set for all tokens
            idx = run.calibration.static_ids((self.layer, expert), policy.density, k).expand(n, k)
        if run.seq_len:
            return self._exposed(run, x2, idx, w)
        y, h_sel = run.kernel(x2, idx, w)
        if run.recorder is not None:
            if h_all is None and run.recorder.wants_activations:
                h_all = activations(x2, w)
            offset = self.offsets[expert]
            ids = torch.where(idx >= 0, idx + offset, idx)
            run.recorder.add(self.layer, rows, ids, h_sel, h_all, offset=offset, oracle_k=k, width=w.d_ff)
        return y

    def _sparse_inputs(self, run: Run, x2: torch.Tensor, rows: torch.Tensor | None, w: MLPWeights,
                       expert: int = -1) -> torch.Tensor:
        """Scope all: gate and up read the kept entries of x [n, d], down the kept neurons of h;
        y = W_down (h * mask_h) + b. A fused gate_up (one name for both roles) keeps one set of entries."""
        rows = _positions(x2) if rows is None else rows
        names = self.names[-1 if expert < 0 else "expert"]
        fused = w.up is not None and names["gate"] == names.get("up")
        gate_w = torch.cat([w.gate, w.up]) if fused else w.gate                    # [d_ff or 2 d_ff, d]
        m_gate = keep_mask(run, self.layer, names["gate"], x2, gate_w, self.norms, (expert, "gate"))
        h = w.act(project(run, x2, m_gate, w.gate, w.b_gate))                        # [n, d_ff]
        masks = [(names["gate"], x2, m_gate, gate_w)]
        if w.up is not None:
            m_up = m_gate if fused else keep_mask(run, self.layer, names["up"], x2, w.up, self.norms, (expert, "up"))
            up = project(run, x2, m_up, w.up, w.b_up)
            h = h * (up if w.up_act is None else w.up_act(up))
            if not fused:
                masks.append((names["up"], x2, m_up, w.up))
        if run.seq_len:                                                              # attribution: expose h
            h = self.neurons(h.reshape(-1, run.seq_len, w.d_ff)).reshape(-1, w.d_ff)
        down_w = w.down_t.t()                                                        # [d_out, d_ff]
        m_down = keep_mask(run, self.layer, names["down"], h, down_w, self.norms, (expert, "down"))
        y = project(run, h, m_down, down_w, w.b_down)
        masks.append((names["down"], h, m_down, down_w))
        if run.inputs is not None:
            for name, inp, mask, weight in masks:
                run.inputs.add(self.layer, name, rows, mask, inp.shape[-1], weight.shape[0], keep=expert < 0)
        if run.recorder is not None:
            offset = self.offsets[expert]
            ids = None if m_down is None else mask_indices(m_down)                  # [n, k_max], -1 pad
            values = None if ids is None else torch.gather(h, 1, ids.clamp(min=0)) * (ids >= 0)
            ids = None if ids is None else torch.where(ids >= 0, ids + offset, ids)
            run.recorder.add(self.layer, rows, ids, values, h if run.recorder.wants_activations else None,
                             offset=offset, oracle_k=None if ids is None else run.policy.k(w.d_ff), width=w.d_ff)
        return y

    def _exposed(self, run: Run, x2: torch.Tensor, idx: torch.Tensor, w: MLPWeights) -> torch.Tensor:
        """Masked dense, with every h_j passing through self.neurons as [B, T, d_ff], so that captum's
        layer methods can attribute to neurons (the reference kernel's equation, differentiable)."""
        h = activations(x2, w)                                           # [N, d_ff]
        h = self.neurons(h.reshape(-1, run.seq_len, w.d_ff)).reshape(-1, w.d_ff)
        return F.linear(h * selection_mask(idx, w.d_ff), w.down_t.t(), w.b_down)

    def _moe(self, run: Run, x2: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each unit's MLP (picked routed experts, shared experts) run sparsely on its tokens, weighted
        as the model weights it. Returns (y [N, d], the routing weights: what the block returns beside y)."""
        units, r = self._units(run, x2)
        if run.policy.kind == "threshold" and run.calibrating and self.layer not in run.thresholds:
            scores = []                                  # one threshold over all units of the layer
            for e, tok, xe, _ in units:
                w = self._weights(run, e)
                score = w.act(F.linear(xe, w.gate, w.b_gate)).abs()
                scores.append((score[run.token_mask[rows[tok]]] if run.token_mask is not None else score).flatten())
            run.threshold(self.layer, torch.cat(scores))
        y = torch.zeros_like(x2)
        for e, tok, xe, scale in units:
            ye = self._sparse(run, xe, rows[tok], self._weights(run, e), expert=e)
            y.index_add_(0, tok, (ye if scale is None else ye * scale).to(y.dtype))
        return y, r.weights


def _positions(x2: torch.Tensor) -> torch.Tensor:
    return torch.arange(x2.shape[0], device=x2.device)                 # [N] token positions


def install(loaded: LoadedModel) -> list[SparseMLP]:
    """Wrap every MLP of `loaded` once (idempotent, thread-safe); returns the wrappers by layer."""
    adapter = loaded.adapter
    with _INSTALL_LOCK:
        wrappers = []
        for i, layer in enumerate(loaded.layers):
            entry = get_path(layer, adapter.entry)
            if not isinstance(entry, SparseMLP):
                entry = SparseMLP(i, adapter, entry, [get_path(layer, p) for p in adapter.tail])
                set_path(layer, adapter.entry, entry)
                for path in adapter.tail:
                    set_path(layer, path, Absorbed())
            wrappers.append(entry)
        return wrappers
