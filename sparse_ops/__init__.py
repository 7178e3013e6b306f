"""Sparse activation: policies (which neurons), kernels (compute only those), and the reversible
`sparsified` context that runs a loaded model sparsely. Knows no architecture names."""
from .calibration import SAMPLE_PROMPTS, calibrate_thresholds
from .context import Run, current_run
from .kernels import KERNELS, activations, available_kernels, get_kernel, reference
from .mlp import Absorbed, SparseMLP, install
from .policy import POLICIES, Policy, parse_density, topk_indices
from .recorder import LayerFiring, Recorder
from .runtime import sparsified

__all__ = [
    "Absorbed", "KERNELS", "LayerFiring", "POLICIES", "Policy", "Recorder", "Run", "SAMPLE_PROMPTS",
    "SparseMLP", "activations", "available_kernels", "calibrate_thresholds", "current_run", "get_kernel",
    "install", "parse_density", "reference", "sparsified", "topk_indices",
]
