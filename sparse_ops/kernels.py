"""Sparse MLP kernels behind one signature, chosen by name from a registry (as transformers'
ALL_ATTENTION_FUNCTIONS).

    kernel(x [N, d], idx [N, k] int64 (-1 = no neuron), w: MLPWeights) -> (y [N, d_out], h [N, k])

y = sum over selected j of h_j * w.down_t[j] (+ b_down); h holds the selected activations
(0 where idx is -1). Backends: `reference` (plain torch, the oracle in tests), `cpu` (compiled
gather-GEMV reading only the selected rows, sparse_ops/cpu.py) and `triton` (the same on a GPU,
sparse_ops/triton_kernel.py). `available_kernels()` names those that run on this machine,
`unavailable_kernels()` says why each other one does not, and asking for one of those fails with
that reason, never a fallback. `default_kernel()` is `cpu` where it is built and loads, else `reference`.

The compiled backends have no backward pass: when autograd needs one (x requires grad, as in
attribution), they compute the same equation with torch ops (`reference`), which autograd can follow.

A second family, for a projection whose *input* is sparse (the whole-model scope, TEAL / Q-Sparse),
with the same names, availability and refusals (`INPUT_KERNELS`, `get_input_kernel`):

    input_kernel(x [N, d_in], idx [N, k] int64 (-1 = none), p: ProjWeights) -> y [N, d_out]

y[n] = sum over the selected i of x[n, i] W[:, i] (+ b) = F.linear(x * mask, W, b), the mask holding
idx's entries (distinct within a token); the compiled backends read only the selected rows of W^T.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Callable

import torch
import torch.nn.functional as F

from sam_viz.models import InputError, MLPWeights

from . import cpu
from .policy import selection_mask
from .proj import ProjWeights

Kernel = Callable[[torch.Tensor, torch.Tensor, MLPWeights], tuple[torch.Tensor, torch.Tensor]]
InputKernel = Callable[[torch.Tensor, torch.Tensor, ProjWeights], torch.Tensor]


def activations(x: torch.Tensor, w: MLPWeights) -> torch.Tensor:
    """All neurons: h = act(x W_gate^T + b) [* up_act(x W_up^T + b_up)]  -> [N, d_ff]."""
    h = w.act(F.linear(x, w.gate, w.b_gate))
    if w.up is not None:
        up = F.linear(x, w.up, w.b_up)
        h = h * (up if w.up_act is None else w.up_act(up))
    return h


def reference(x: torch.Tensor, idx: torch.Tensor, w: MLPWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked dense: compute every h_j, zero the unselected ones, project down. Obviously correct."""
    h_all = activations(x, w)                                        # [N, d_ff]
    y = F.linear(h_all * selection_mask(idx, w.d_ff), w.down_t.t(), w.b_down)   # [N, d_out]
    return y, torch.gather(h_all, 1, idx.clamp(min=0)) * (idx >= 0)


def _needs_grad(x: torch.Tensor, w: MLPWeights) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or w.gate.requires_grad or w.down_t.requires_grad)


def _cpu(x: torch.Tensor, idx: torch.Tensor, w: MLPWeights) -> tuple[torch.Tensor, torch.Tensor]:
    if _needs_grad(x, w):
        return reference(x, idx, w)
    return cpu.cpu_kernel(x, idx, w)


def _triton_module():
    try:                                       # imported on first use: triton is optional here
        return importlib.import_module(".triton_kernel", __package__)
    except ImportError as exc:
        raise InputError(f"the triton kernel needs the triton package ({exc})") from None


def _triton(x: torch.Tensor, idx: torch.Tensor, w: MLPWeights) -> tuple[torch.Tensor, torch.Tensor]:
    if _needs_grad(x, w):
        return reference(x, idx, w)
    return _triton_module().triton_kernel(x, idx, w)


KERNELS: dict[str, Kernel] = {"reference": reference, "cpu": _cpu, "triton": _triton}


def input_reference(x: torch.Tensor, idx: torch.Tensor, p: ProjWeights) -> torch.Tensor:
    """Masked dense: zero the unselected input entries, then the projection. Obviously correct."""
    return F.linear(x * selection_mask(idx, p.d_in), p.weight, p.bias)     # [N, d_out]


def _input_needs_grad(x: torch.Tensor, p: ProjWeights) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or p.weight.requires_grad
                                        or (p.bias is not None and p.bias.requires_grad))


def _cpu_input(x: torch.Tensor, idx: torch.Tensor, p: ProjWeights) -> torch.Tensor:
    if _input_needs_grad(x, p):
        return input_reference(x, idx, p)
    return cpu.input_kernel(x, idx, p)


def _triton_input(x: torch.Tensor, idx: torch.Tensor, p: ProjWeights) -> torch.Tensor:
    if _input_needs_grad(x, p):
        return input_reference(x, idx, p)
    return _triton_module().triton_input_kernel(x, idx, p)


INPUT_KERNELS: dict[str, InputKernel] = {"reference": input_reference, "cpu": _cpu_input, "triton": _triton_input}


def _triton_unavailable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "it needs the triton package, which is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "it needs a CUDA GPU and torch finds none here (TRITON_INTERPRET=1 runs it slowly on the CPU)"
    return None


def unavailable_kernels() -> dict[str, str]:
    """{name: why it cannot run on this machine}, for the registered kernels that cannot."""
    state, why = cpu.readiness()
    out = {"cpu": why} if state == "unavailable" else {}
    triton_why = _triton_unavailable()
    return out | ({"triton": triton_why} if triton_why else {})


def available_kernels() -> list[str]:
    """The registered kernels that run here (`cpu` also when not built yet but buildable)."""
    missing = unavailable_kernels()
    return [name for name in KERNELS if name not in missing]


def default_kernel() -> str:
    """`cpu` where it is built and loads (`make` builds it), else `reference`; never builds."""
    return "cpu" if cpu.readiness()[0] == "ready" else "reference"


def _lookup(registry: dict, name: str):
    if name not in registry:
        raise InputError(f"unknown kernel '{str(name)[:40]}'; available here: {', '.join(available_kernels())}")
    why = unavailable_kernels().get(name)
    if why:
        raise InputError(f"the {name} kernel cannot run here: {why}")
    return registry[name]


def get_kernel(name: str) -> Kernel:
    return _lookup(KERNELS, name)


def get_input_kernel(name: str) -> InputKernel:
    """The input kernel of that name (the MLP kernels' names; the same refusals)."""
    return _lookup(INPUT_KERNELS, name)
