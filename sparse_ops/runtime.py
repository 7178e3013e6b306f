"""`sparsified(loaded, policy)`: run a model with every MLP computed sparsely, for this call only.

Sets the per-call Run in a ContextVar and resets it in `finally`, so on exit (also after an
exception) the model computes exactly as before and nothing of the run is left behind.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from models import LoadedModel

from .calibration import calibrate_thresholds
from .context import _RUN, Run
from .kernels import get_kernel
from .mlp import install
from .policy import Policy
from .recorder import Recorder


@contextmanager
def sparsified(loaded: LoadedModel, policy: Policy, *, kernel: str = "reference",
               recorder: Recorder | None = None) -> Iterator[Run]:
    kern = get_kernel(kernel)
    install(loaded)
    run = Run(policy=policy, kernel=kern, recorder=recorder)
    if policy.kind == "threshold" and not policy.is_full:
        run.thresholds = dict(calibrate_thresholds(loaded, policy.density, kern))
    token = _RUN.set(run)
    try:
        yield run
    finally:
        _RUN.reset(token)
