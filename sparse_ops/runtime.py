"""`sparsified(loaded, policy)`: run a model with every MLP computed sparsely, for this call only.

Sets the per-call Run in a ContextVar and resets it in `finally`, so on exit (also after an
exception) the model computes exactly as before and nothing of the run is left behind.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from sam_viz.models import LoadedModel

from .calibration import Calibration, Progress, calibrate_thresholds, get_calibration
from .context import _RUN, Run
from .kernels import get_kernel
from .mlp import install
from .policy import CALIBRATED, Policy
from .recorder import Recorder


@contextmanager
def sparsified(loaded: LoadedModel, policy: Policy, *, kernel: str = "reference",
               recorder: Recorder | None = None, progress: Progress | None = None,
               frozen: dict[int, torch.Tensor] | None = None, seq_len: int = 0,
               calibration: Calibration | None = None) -> Iterator[Run]:
    """Run `loaded` sparsely inside the block. `predictor` and `static` need the model's calibration:
    loaded from disk, or trained first (with `progress`) when nothing is stored.
    frozen: {layer: [T, k] neuron ids per token position} used instead of the policy's choice (MoE
    experts keep choosing). seq_len > 0: expose h through each SparseMLP.neurons as [B, seq_len, d_ff].
    calibration: use this one for predictor / static instead of the model's stored one."""
    kern = get_kernel(kernel)
    install(loaded)
    run = Run(policy=policy, kernel=kern, recorder=recorder, frozen=frozen, seq_len=seq_len)
    if policy.kind == "threshold" and not policy.is_full:
        get_calibration(loaded, train=False)              # stored thresholds, if `calibrate` ran
        run.thresholds = dict(calibrate_thresholds(loaded, policy.density, kern))
    if policy.kind in CALIBRATED and not policy.is_full:
        run.calibration = calibration or get_calibration(loaded, progress)
    token = _RUN.set(run)
    try:
        yield run
    finally:
        _RUN.reset(token)
