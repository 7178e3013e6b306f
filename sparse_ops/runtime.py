"""`sparsified(loaded, policy)`: run a model with every MLP computed sparsely (scope mlp), or every
projection reading only the kept entries of its input (scope all), for this call only.

Sets the per-call Run in a ContextVar and resets it in `finally`, so on exit (also after an
exception) the model computes exactly as before and nothing of the run is left behind.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from sam_viz.models import LoadedModel

from sam_viz.models import InputError

from .calibration import Calibration, Progress, calibrate_thresholds, get_calibration
from .context import _RUN, Run
from .kernels import get_input_kernel, get_kernel
from .inputs import InputRecorder, install_projections
from .mlp import install
from .policy import CALIBRATED, INPUT_CALIBRATED, Policy
from .recorder import Recorder


@contextmanager
def sparsified(loaded: LoadedModel, policy: Policy, *, kernel: str = "reference",
               recorder: Recorder | None = None, progress: Progress | None = None,
               frozen: dict[int, torch.Tensor] | None = None, seq_len: int = 0,
               calibration: Calibration | None = None, inputs: InputRecorder | None = None,
               input_calibration=None) -> Iterator[Run]:
    """Run `loaded` sparsely inside the block. `predictor` and `static` need the model's calibration:
    loaded from disk, or trained first (with `progress`) when nothing is stored.
    frozen: {layer: [T, k] neuron ids per token position} used instead of the policy's choice (MoE
    experts keep choosing). seq_len > 0: expose h through each SparseMLP.neurons as [B, seq_len, d_ff].
    calibration: use this one for predictor / static instead of the model's stored one.
    Scope all: every declared projection is wrapped (once); `inputs` records what each one read;
    teal / wina read their thresholds from `input_calibration` (an object with
    threshold(layer, proj, density, allocation) -> float), by default the model's stored one
    (sam_viz.sparse_ops.input_calibration.get_input_calibration). `frozen` fixes MLP neurons only, so
    it is not taken under scope all."""
    kern = get_kernel(kernel)
    install(loaded)
    if policy.scope == "all":
        install_projections(loaded)
        if frozen is not None:
            raise InputError("a frozen neuron selection is for scope mlp; under scope all the policy chooses "
                             "every projection's inputs itself")
    run = Run(policy=policy, kernel=kern, recorder=recorder, frozen=frozen, seq_len=seq_len, inputs=inputs,
              input_kernel=get_input_kernel(kernel) if policy.scope == "all" else None)
    if policy.kind in INPUT_CALIBRATED and not policy.is_full:
        run.input_calibration = input_calibration or _stored_input_calibration(loaded, progress)
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


def _stored_input_calibration(loaded: LoadedModel, progress: Progress | None):
    """The model's input calibration (teal / wina thresholds), made on first use as `calibrate` makes it."""
    try:
        from .input_calibration import get_input_calibration
    except ImportError:
        raise InputError("teal and wina need an input calibration, and this build has none yet "
                         "(sam_viz.sparse_ops.input_calibration); use topk under scope all") from None
    return get_input_calibration(loaded, progress=progress)
