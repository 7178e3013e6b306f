"""Top-k on the input of every projection in the training loop (Q-Sparse style), for demo-lm-all.

`TopKInput` wraps one nn.Linear (kept inside as `.linear`). Per token it keeps the
k = round(density * d_in) entries of its input x with the largest abs(x_i) (ties to the lower index,
as the app's whole-model `topk` does) and zeroes the rest, then y = W x_kept (+ b). The backward pass
is straight-through, as in Q-Sparse: the gradient with respect to x is the gradient with respect to
x_kept, on every entry (dropped ones included), while W's gradient sees only x_kept.

`install` wraps q, k, v, o (attention) and gate, up, down (MLP) of every Llama decoder layer;
`uninstall` puts the plain Linear modules back, so the exported checkpoint is a plain Llama one. At
density d this is the app's whole-model `topk` policy at d, so inference computes what training did.
"""
from __future__ import annotations

import torch
from torch import nn

PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
               ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def keep_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest abs(x) along the last axis, ties to the lower index (as a stable
    descending sort keeps them). By the k-th largest value t: every entry above t, then the entries
    equal to t in index order until k are kept (about 8x faster than sorting each row on the CPU)."""
    d = x.shape[-1]
    if k >= d:
        return torch.ones_like(x, dtype=torch.bool)
    a = x.abs()
    t = a.kthvalue(d - k + 1, dim=-1, keepdim=True).values            # the k-th largest
    above = a > t
    at = a == t
    room = k - above.sum(-1, keepdim=True)                             # >= 1 entries equal to t
    return above | (at & (at.cumsum(-1) <= room))


class TopKInput(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.d_in = linear.in_features
        self.density = 1.0            # set by the training loop from the sparsity schedule

    def k(self) -> int:
        return min(self.d_in, max(1, round(self.density * self.d_in)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k()
        if k < self.d_in:
            kept = x * keep_mask(x.detach(), k)
            x = x + (kept - x).detach()          # forward: x_kept; backward: identity (straight-through)
        return self.linear(x)


def install(model: nn.Module) -> list[TopKInput]:
    """Wrap the seven projections of every decoder layer; returns the wrappers (set their .density)."""
    wrappers = []
    for layer in model.model.layers:
        for part, name in PROJECTIONS:
            owner = getattr(layer, part)
            wrapper = TopKInput(getattr(owner, name))
            setattr(owner, name, wrapper)
            wrappers.append(wrapper)
    return wrappers


def uninstall(model: nn.Module) -> None:
    """Put the plain projections back (a no-op on a model without wrappers)."""
    for layer in model.model.layers:
        for part, name in PROJECTIONS:
            owner = getattr(layer, part)
            if isinstance(getattr(owner, name), TopKInput):
                setattr(owner, name, getattr(owner, name).linear)
