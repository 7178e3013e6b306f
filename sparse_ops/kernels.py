"""Sparse MLP kernels behind one signature, chosen by name from a registry (as transformers'
ALL_ATTENTION_FUNCTIONS).

    kernel(x [N, d], idx [N, k] int64 (-1 = no neuron), w: MLPWeights) -> (y [N, d_out], h [N, k])

y = sum over selected j of h_j * w.down_t[j] (+ b_down); h holds the selected activations
(0 where idx is -1). Backends: `reference` (plain torch, the oracle in tests), `cpu` (compiled
gather-GEMV reading only the selected rows, sparse_ops/cpu.py) and `triton` (the same on a GPU,
sparse_ops/triton_kernel.py). Asking for one that cannot run
fails with a clear error, never a fallback.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from models import InputError, MLPWeights

from .policy import selection_mask

Kernel = Callable[[torch.Tensor, torch.Tensor, MLPWeights], tuple[torch.Tensor, torch.Tensor]]


def activations(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    """All neurons: h = act(x W_gate^T + b) [* (x W_up^T + b_up)]  -> [N, d_ff]."""
    h = w.act(F.linear(x, w.gate, w.b_gate))
    if w.up is not None:
        h = h * F.linear(x, w.up, w.b_up)
    return h


def reference(x: torch.Tensor, idx: torch.Tensor, w: MLPWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked dense: compute every h_j, zero the unselected ones, project down. Obviously correct."""
    h_all = activations(x, w)                                        # [N, d_ff]
    y = F.linear(h_all * selection_mask(idx, w.d_ff), w.down_t.t(), w.b_down)   # [N, d_out]
    return y, torch.gather(h_all, 1, idx.clamp(min=0)) * (idx >= 0)


def _cpu(x: torch.Tensor, idx: torch.Tensor, w: MLPWeights) -> tuple[torch.Tensor, torch.Tensor]:
    from .cpu import cpu_kernel                # built on first use

    return cpu_kernel(x, idx, w)


def _triton(x: torch.Tensor, idx: torch.Tensor, w: MLPWeights) -> tuple[torch.Tensor, torch.Tensor]:
    try:                                       # imported on first use: triton is optional here
        from .triton_kernel import triton_kernel
    except ImportError as exc:
        raise InputError(f"the triton kernel needs the triton package ({exc})") from None
    return triton_kernel(x, idx, w)


KERNELS: dict[str, Kernel] = {"reference": reference, "cpu": _cpu, "triton": _triton}


def available_kernels() -> list[str]:
    return list(KERNELS)


def get_kernel(name: str) -> Kernel:
    try:
        return KERNELS[name]
    except KeyError:
        raise InputError(f"unknown kernel '{name}'; available here: {', '.join(KERNELS)}") from None
