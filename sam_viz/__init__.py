"""sam-viz: the analysis library under the app. Never imports Streamlit."""
from models import BUILTIN_SPECS, DEFAULT_MODEL, InputError, LoadedModel, load_model

from .analysis import Analysis, Outputs, analyze, compare_outputs, encode_prompt, forward, sentence_embedding
from .spec import RunSpec

__all__ = [
    "Analysis", "BUILTIN_SPECS", "DEFAULT_MODEL", "InputError", "LoadedModel", "Outputs", "RunSpec",
    "analyze", "compare_outputs", "encode_prompt", "forward", "load_model", "sentence_embedding",
]
