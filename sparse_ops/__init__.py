"""Sparse activation: policies (which neurons), kernels (compute only those), and the reversible
`sparsified` context that runs a loaded model sparsely. Knows no architecture names."""
if __name__ != "sam_viz.sparse_ops":        # one name per file (sam_viz/_folders.py)
    raise ImportError("sparse_ops/ is the package sam_viz.sparse_ops: import it by that name "
                      "(python -m tools.rewrite_imports rewrites the old imports)")

from .calibration import (GRID, Calibration, Settings, calibrate, calibrate_thresholds, calibration_texts,
                          get_calibration)
from .context import Run, current_run
from .inputs import InputRecorder, ProjectionInputs, SparseLinear, attention_weights, install_projections
from .kernels import (INPUT_KERNELS, KERNELS, activations, available_kernels, default_kernel, get_input_kernel,
                      get_kernel, input_reference, reference, unavailable_kernels)
from .mlp import Absorbed, SparseMLP, install
from .policy import (ALLOCATIONS, CALIBRATED, INPUT_CALIBRATED, POLICIES, SCOPE_POLICIES, SCOPES, Policy,
                     parse_density, topk_indices)
from .proj import ProjWeights
from .recorder import LayerFiring, Recorder
from .runtime import sparsified

__all__ = [
    "ALLOCATIONS", "Absorbed", "CALIBRATED", "Calibration", "GRID", "INPUT_CALIBRATED", "INPUT_KERNELS",
    "InputRecorder", "KERNELS", "LayerFiring", "POLICIES", "Policy", "ProjWeights", "ProjectionInputs", "Recorder",
    "Run", "SCOPES", "SCOPE_POLICIES", "Settings", "SparseLinear", "SparseMLP", "activations", "attention_weights",
    "available_kernels", "calibrate", "calibrate_thresholds", "calibration_texts", "current_run", "default_kernel",
    "get_calibration", "get_input_kernel", "get_kernel", "input_reference", "install", "install_projections",
    "parse_density", "reference", "sparsified", "topk_indices", "unavailable_kernels",
]
