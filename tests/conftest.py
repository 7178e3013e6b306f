import functools
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# calibrations (predictors, static sets) trained by tests go to a fresh folder, never ~/.cache
os.environ["SAM_VIZ_CACHE_DIR"] = os.environ.get("SAM_VIZ_TEST_CACHE_DIR") or __import__("tempfile").mkdtemp(
    prefix="sam-viz-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the `triton` kernel runs in Triton's interpreter; triton reads this when the kernel
# module is imported, so it is set before any test (test_kernels.py runs every backend).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from sam_viz.models import BUILTIN_SPECS, load_model  # noqa: E402

TINY = [s for s in BUILTIN_SPECS if s.startswith("tiny-")]
ALL_SPECS = list(BUILTIN_SPECS)

# Held-out prompts for the tests: none of them is in the calibration texts' train split.
HELD_OUT = (
    "A lighthouse keeper counted the ships that passed during the long winter storm.",
    "Quantum computers use qubits, which can hold superpositions of zero and one.",
    "My grandmother grows tomatoes, beans and sunflowers in her small garden.",
    "The referee blew the whistle and the crowd rose to its feet in the final minute.",
    "To reset the router, hold the button for ten seconds and wait for the light.",
    "Ancient Rome built aqueducts that carried water across valleys for miles.",
)


@functools.lru_cache(maxsize=None)
def shared(spec: str):
    """One loaded model per spec for the whole session, as st.cache_resource would share it."""
    return load_model(spec)


@pytest.fixture
def fresh():
    """A newly loaded model that no sparse wrapper has touched: the 'as shipped' reference."""
    return load_model


def model_output(loaded, enc):
    out = loaded.model(**enc)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny models: they gain nothing from threads, and on a busy
    2-core machine two threads wait on each other (a 4 s test took 198 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
