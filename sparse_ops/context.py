"""The per-call state of a sparse run, carried in a ContextVar (see Concurrency in DESIGN.md).

The SparseMLP wrappers are installed once per model and read the active Run from here, so two
threads (two Streamlit sessions) can run different policies on one shared model at once.
"""
from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from sam_viz.models import InputError

from .kernels import Kernel
from .policy import Policy
from .recorder import Recorder


@dataclass
class Run:
    policy: Policy
    kernel: Kernel
    recorder: Recorder | None = None
    thresholds: dict[int, float] = field(default_factory=dict)
    calibrating: bool = False              # fill `thresholds` layer by layer from this pass
    token_mask: torch.Tensor | None = None  # [N] bool: tokens that count when calibrating (not padding)
    calibration: object | None = None       # sam_viz.sparse_ops.calibration.Calibration (predictor, static)
    collector: object | None = None         # sam_viz.sparse_ops.calibration.Collector: gathers (x, h) per unit
    frozen: dict[int, torch.Tensor] | None = None  # layer -> [T, k] ids (-1 pad) per token position: a
                                                   # fixed selection, e.g. along an attribution path
    seq_len: int = 0                        # > 0: pass h [B, T, d_ff] through SparseMLP.neurons (captum)
    weights: dict = field(default_factory=dict)  # (SparseMLP, expert) -> MLPWeights, resolved once per run
    inputs: object | None = None            # scope all: sam_viz.sparse_ops.inputs.InputRecorder
    input_kernel: object | None = None      # scope all: the sparse-input kernel (kernels.INPUT_KERNELS) of the
                                            # run's backend; None: F.linear of the masked input
    input_calibration: object | None = None  # teal / wina: threshold(layer, proj, density, allocation, kind) -> float

    def input_threshold(self, layer: int, proj: str) -> float:
        """teal / wina: the threshold of projection `proj` of `layer` at the run's density and allocation."""
        p = self.policy
        try:
            return float(self.input_calibration.threshold(layer, proj, p.density, p.allocation, kind=p.kind))
        except KeyError:
            raise InputError(f"the input calibration has no threshold for layer {layer}'s {proj} projection "
                             f"(mixture-of-experts units are not calibrated yet); use topk under scope all") from None

    def threshold(self, layer: int, scores: torch.Tensor, rows: torch.Tensor | None = None) -> float:
        """The layer's threshold; when calibrating and not yet set, the value that keeps a
        `density` share of `scores` [n, d_ff] (rows: their token positions, to drop padding)."""
        if self.policy.is_full:
            return -math.inf
        if layer not in self.thresholds:
            if not self.calibrating:
                raise RuntimeError(f"no calibrated threshold for layer {layer}")
            if self.token_mask is not None and rows is not None:
                scores = scores[self.token_mask[rows]]
            self.thresholds[layer] = quantile_threshold(scores.flatten(), self.policy.density)
        return self.thresholds[layer]


def quantile_threshold(scores: torch.Tensor, density: float) -> float:
    """t such that round(density * n) of the n scores are > t (up to ties)."""
    n = scores.numel()
    k = round(density * n)
    if n == 0 or k >= n:
        return -math.inf
    return float(torch.kthvalue(scores.float(), n - k).values)


_RUN: ContextVar[Run | None] = ContextVar("sparse_ops_run", default=None)


def current_run() -> Run | None:
    return _RUN.get()
