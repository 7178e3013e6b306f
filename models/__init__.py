"""Model loading and per-family MLP adapters. Knows nothing about sparsity."""
if __name__ != "sam_viz.models":        # one name per file (sam_viz/_folders.py)
    raise ImportError("models/ is the package sam_viz.models: import it by that name "
                      "(python -m tools.rewrite_imports rewrites the old imports)")

from .adapters import ADAPTERS, MLPAdapter, MLPWeights, Proj, adapter_for, get_path, mlp_weights
from .errors import InputError, KernelCannotCompute
from .loading import BUILTIN_SPECS, DEFAULT_MODEL, MAX_TOKENS, LoadedModel, allowed_roots, load_model

__all__ = [
    "ADAPTERS", "BUILTIN_SPECS", "DEFAULT_MODEL", "MAX_TOKENS", "InputError", "KernelCannotCompute", "LoadedModel",
    "MLPAdapter", "MLPWeights", "Proj", "adapter_for", "allowed_roots", "get_path", "load_model", "mlp_weights",
]
