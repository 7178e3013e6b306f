"""Top-k MLP sparsity in the training loop, and the schedules of tools/train_demo.py.

`TopKMLP` wraps a transformers LlamaMLP (kept inside as `.dense`) and computes, per token,
h = silu(W_gate x) * (W_up x), keeps the k = round(density * d_ff) entries of largest abs(h) and
zeroes the rest, then y = W_down h. At density 0.1 this is the app's `topk` policy (sparse_ops,
DESIGN.md), so a model trained this way runs at inference exactly as it was trained. The gradient
flows through the kept entries only. `install` / `uninstall` swap the wrappers in and out of a
model's decoder layers, so the saved checkpoint is a plain Llama checkpoint.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class TopKMLP(nn.Module):
    def __init__(self, dense: nn.Module):
        super().__init__()
        self.dense = dense
        self.d_ff = dense.intermediate_size
        self.density = 1.0            # set by the training loop from sparsity_schedule

    def k(self) -> int:
        return min(self.d_ff, max(1, round(self.density * self.d_ff)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.dense
        h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)                        # [..., d_ff]
        k = self.k()
        if k < self.d_ff:
            keep = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, h.abs().topk(k, dim=-1).indices, True)
            h = h * keep
        return m.down_proj(h)


def install(model: nn.Module) -> list[TopKMLP]:
    """Wrap every decoder layer's MLP; returns the wrappers (set their .density)."""
    wrappers = []
    for layer in model.model.layers:
        layer.mlp = TopKMLP(layer.mlp)
        wrappers.append(layer.mlp)
    return wrappers


def uninstall(model: nn.Module) -> None:
    """Put the original MLPs back (a no-op on a model without wrappers)."""
    for layer in model.model.layers:
        if isinstance(layer.mlp, TopKMLP):
            layer.mlp = layer.mlp.dense


def set_density(wrappers: list[TopKMLP], density: float) -> None:
    for w in wrappers:
        w.density = density


def sparsity_schedule(step: int, steps: int, target: float, dense_until: float = 0.05,
                      reach_at: float = 0.30) -> float:
    """MLP density at `step`: 1.0 for the first `dense_until` of the steps, then annealed
    linearly in log space down to `target` at `reach_at` of the steps, then `target`."""
    t0, t1 = dense_until * steps, reach_at * steps
    if step < t0:
        return 1.0
    if step >= t1:
        return target
    return math.exp(math.log(target) * (step - t0) / (t1 - t0))


def lr_schedule(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine down to floor * peak at the end."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
