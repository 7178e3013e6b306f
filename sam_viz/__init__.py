"""sam-viz: the analysis library under the app. Never imports Streamlit."""
from . import _folders

_folders.install()              # sam_viz.models and sam_viz.sparse_ops in a clone: before their first use

from sam_viz.models import (BUILTIN_SPECS, DEFAULT_MODEL, InputError, KernelCannotCompute, LoadedModel, allowed_roots,
                            load_model)

from .analysis import Analysis, Outputs, analyze, compare_outputs, encode_prompt, forward, sentence_embedding
from .explore import (SWEEP_DENSITIES, SWEEP_POLICIES, calibration_counts, density_sweep, firing_counts,
                      greedy_continuation, mass_curve)
from .spec import RunSpec

__all__ = [
    "Analysis", "BUILTIN_SPECS", "DEFAULT_MODEL", "InputError", "KernelCannotCompute", "LoadedModel", "Outputs", "RunSpec",
    "SWEEP_DENSITIES", "SWEEP_POLICIES", "allowed_roots", "analyze", "calibration_counts", "compare_outputs",
    "density_sweep", "encode_prompt", "firing_counts", "forward", "greedy_continuation", "load_model", "mass_curve",
    "sentence_embedding",
]
