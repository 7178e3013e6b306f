"""Which neurons a sparse MLP computes for each token.

`topk` is the oracle of the DESIGN table (exactly k = round(density * d_ff) largest abs(h_j) per
token, ties to the lower index); `threshold` keeps neurons whose score is above a per-layer
threshold calibrated to the target density (scores as in CATS: abs(act(W_gate x)) for GLU models,
abs(h) otherwise); `predictor` keeps the k neurons a low-rank network scores highest from the MLP
input, before any MLP weight is read (Deja Vu); `static` keeps the same k neurons for every token,
those most often in the oracle top-k on calibration text (the pruning baseline).

A policy also has a scope (DESIGN.md, "Sparsity on every projection"): `mlp` chooses the MLP's
neurons, as above; `all` chooses, per token, which entries of each projection's *input* are used
(sam_viz.sparse_ops.inputs): `topk` keeps the k = round(density * d_in) largest abs(x_i) (Q-Sparse),
`teal` those with abs(x_i) > t and `wina` those with abs(x_i) * ||W[:, i]||_2 > t, t calibrated per
(layer, projection) for the density and the `allocation` (uniform, or TEAL's greedy; the thresholds
come from an input calibration). The threshold, predictor and static policies choose neurons only,
so they have no meaning under `all`; teal and wina choose input entries only, so none under `mlp`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sam_viz.models import InputError

SCOPES = ("mlp", "all")
SCOPE_POLICIES = {"mlp": ("dense", "topk", "threshold", "predictor", "static"),
                  "all": ("dense", "topk", "teal", "wina")}
POLICIES = ("dense", "topk", "threshold", "predictor", "static", "teal", "wina")
CALIBRATED = ("predictor", "static")       # need sam_viz.sparse_ops.calibration data for the model
INPUT_CALIBRATED = ("teal", "wina")        # need an input calibration (thresholds per layer and projection)
ALLOCATIONS = ("uniform", "greedy")        # how teal / wina spread a block's density over its projections


@dataclass(frozen=True)
class Policy:
    kind: str = "dense"
    density: float = 1.0
    scope: str = "mlp"                     # mlp: the MLP's neurons; all: every projection's input
    allocation: str = "greedy"             # teal / wina: uniform or greedy (no effect on other policies)

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise InputError(f"unknown policy '{str(self.kind)[:40]}'; choose one of {', '.join(POLICIES)}")
        check_scope(self.kind, self.scope)
        if self.allocation not in ALLOCATIONS:
            raise InputError(f"unknown allocation '{str(self.allocation)[:40]}'; choose uniform or greedy")
        object.__setattr__(self, "density", parse_density(self.density))
        if self.kind == "dense":
            object.__setattr__(self, "density", 1.0)

    @property
    def is_full(self) -> bool:
        """True when every neuron is computed (dense, or any policy at density 1)."""
        return self.density >= 1.0

    def k(self, d_ff: int) -> int:
        return min(d_ff, max(1, round(self.density * d_ff)))


def check_scope(kind: str, scope: str) -> None:
    """One sentence when `scope` is unknown or `kind` has no meaning under it."""
    if scope not in SCOPES:
        raise InputError(f"unknown scope '{str(scope)[:40]}'; choose mlp (the MLP's neurons) or all (every "
                         "projection's input)")
    if kind not in SCOPE_POLICIES[scope]:
        if scope == "all":
            raise InputError(f"the {kind} policy chooses MLP neurons only, so it has no meaning under scope all; "
                             f"choose one of {', '.join(SCOPE_POLICIES['all'])} or scope mlp")
        raise InputError(f"the {kind} policy chooses projection inputs, so it runs under scope all only; "
                         f"choose scope all or one of {', '.join(SCOPE_POLICIES['mlp'])}")


def parse_density(value) -> float:
    """A density from user input (str or number), in (0, 1]; one clear sentence otherwise."""
    try:
        d = float(value)
    except (TypeError, ValueError):
        raise InputError(f"density must be a number in (0, 1], got '{str(value)[:40]}'") from None
    if not math.isfinite(d) or not 0.0 < d <= 1.0:
        raise InputError(f"density must be in (0, 1], got {str(value)[:40]}")
    return d


def topk_indices(h: torch.Tensor, k: int) -> torch.Tensor:
    """[N, d_ff] -> [N, k]: the k largest abs(h) per row, by value, ties to the lower index."""
    order = torch.sort(h.abs(), dim=-1, descending=True, stable=True).indices
    return order[:, :k]


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, d] -> [N, d] bool: topk_indices' set as a mask, by the k-th largest abs(x) t instead of a
    sort (several times faster on the CPU): every entry above t, then those equal to t in index order
    until k are kept (a stable descending sort keeps ties to the lower index the same way)."""
    d = x.shape[-1]
    if k >= d:
        return torch.ones_like(x, dtype=torch.bool)
    a = x.abs()
    t = a.kthvalue(d - k + 1, dim=-1, keepdim=True).values                  # [N, 1] the k-th largest
    above, at = a > t, a == t
    room = k - above.sum(-1, keepdim=True)                                   # >= 1 entries equal to t
    return above | (at & (at.cumsum(-1) <= room))


def selection_mask(idx: torch.Tensor, d_ff: int) -> torch.Tensor:
    """[N, k] int64 (-1 = none) -> [N, d_ff] bool: the inverse of mask_indices. (A plain scatter of
    `valid` could let a padding slot, clamped to 0, clear a selected neuron 0; adding cannot.)"""
    valid = idx >= 0
    hits = torch.zeros(idx.shape[0], d_ff, device=idx.device).scatter_add_(1, idx.clamp(min=0), valid.float())
    return hits > 0


def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """[N, d_ff] bool -> [N, k_max] int64 of the selected neurons in index order, -1 padded."""
    counts = mask.sum(dim=-1)                                            # [N]
    k_max = int(counts.max()) if mask.numel() else 0
    rows, cols = mask.nonzero(as_tuple=True)                             # row-major: rows ascending
    starts = torch.cumsum(counts, 0) - counts
    idx = torch.full((mask.shape[0], k_max), -1, dtype=torch.long, device=mask.device)
    idx[rows, torch.arange(rows.numel(), device=mask.device) - starts[rows]] = cols
    return idx
