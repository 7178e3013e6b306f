"""Per-layer thresholds for the `threshold` policy, calibrated as in CATS / TEAL: for each layer,
the value of abs(act(W_gate x)) above which a target share of neurons lies on sample prompts.

Calibration is sequential in one forward pass: layer l is calibrated on inputs that already went
through the thresholded layers before it, so the density holds on the sparse model as run.
"""
from __future__ import annotations

import threading
import weakref

import torch

from models import LoadedModel

from .context import _RUN, Run
from .kernels import Kernel
from .policy import Policy

SAMPLE_PROMPTS = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "In 1969, astronauts landed on the Moon and walked on its dusty surface.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar and oxygen.",
    "She opened the old wooden box and found a stack of letters tied with ribbon.",
    "The stock market fell sharply after the central bank raised interest rates again.",
    "def add(a, b):\n    return a + b  # a tiny Python function",
    "Mix the flour, sugar and eggs, then bake the cake for forty minutes.",
    "The committee will meet on Tuesday to discuss the budget for next year.",
    "Neurons in the brain communicate through electrical and chemical signals.",
    "He missed the last train home and had to walk through the rain.",
    "Mount Everest is the highest mountain above sea level on Earth.",
    "Please remember to water the plants while I am away on holiday.",
    "The violinist played a haunting melody that filled the empty concert hall.",
    "Large language models predict the next token from the tokens before it.",
    "Children were laughing and chasing each other around the playground.",
    "The recipe calls for two cups of rice and a pinch of salt.",
)

_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[float, dict[int, float]]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def calibrate_thresholds(loaded: LoadedModel, density: float, kernel: Kernel,
                         prompts: tuple[str, ...] = SAMPLE_PROMPTS) -> dict[int, float]:
    """{layer: threshold} reaching `density` on `prompts`; cached per model and density."""
    with _LOCK:
        cached = _CACHE.get(loaded.model, {}).get(density)
    if cached is not None:
        return cached
    enc = loaded.encode_batch(list(prompts))
    run = Run(policy=Policy("threshold", density), kernel=kernel, calibrating=True,
              token_mask=enc["attention_mask"].reshape(-1).bool())
    token = _RUN.set(run)
    try:
        with torch.no_grad():
            loaded.model(**enc)
    finally:
        _RUN.reset(token)
    with _LOCK:
        _CACHE.setdefault(loaded.model, {})[density] = dict(run.thresholds)
    return run.thresholds
