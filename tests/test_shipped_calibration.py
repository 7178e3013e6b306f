"""The built-in models open with a calibration shipped in sparse_ops/data/calibrations (made by
`python -m sam_viz calibrate`), so no class waits for one: found by the same fingerprint as the
cache (weights, settings, texts), and checked here as a calibration of that model: thresholds hit
their density on held-out text, the predictor ranks the oracle's neurons better than the static set."""
import pytest
import torch

from sam_viz.models import load_model
from sam_viz.sparse_ops import Policy, Recorder, sparsified
from sam_viz.sparse_ops import calibration as C

SHIPPED_FOR = ("demo-lm", "demo-lm-dense", "minilm")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_CACHE_DIR", str(tmp_path))


@pytest.mark.parametrize("spec", SHIPPED_FOR)
def test_a_builtin_model_has_its_calibration_without_training(spec, empty_cache):
    loaded = load_model(spec)                       # a model object of its own: nothing in memory for it
    assert (C.SHIPPED / C.path_for(loaded).name).is_file(), (
        f"no shipped calibration matches {spec}'s weights and texts: run `python -m sam_viz calibrate "
        f"--model {spec}` and copy the file from the cache into sparse_ops/data/calibrations")
    cal = C.get_calibration(loaded, train=False)
    assert cal is not None and not C.path_for(loaded).exists()      # read from the package, nothing trained
    assert sorted(cal.thresholds) == list(C.GRID) and len(cal.predictors) == loaded.n_layers


def _held_out(loaded, policy: str, density: float) -> tuple[float, float]:
    """(achieved density, recall of the oracle top-k) over held-out calibration texts."""
    sel = pos = hits = oracle = 0
    for text in C.calibration_texts()["held_out"][:12]:
        rec = Recorder()
        enc = loaded.encode(text)
        with torch.no_grad(), sparsified(loaded, Policy(policy, density), recorder=rec):
            loaded.model(**enc)
        for layer in rec.layers(enc["input_ids"].shape[1], loaded.n_neurons):
            sel, pos = sel + int(layer.selected.sum()), pos + int(layer.possible.sum())
            hits, oracle = hits + int(layer.hits.sum()), oracle + int(layer.oracle.sum())
    return sel / pos, hits / oracle


@pytest.mark.parametrize("spec", SHIPPED_FOR)
def test_the_shipped_calibration_is_one_of_this_model(spec, empty_cache):
    loaded = load_model(spec)
    density, _ = _held_out(loaded, "threshold", 0.25)
    assert abs(density - 0.25) <= 0.06
    _, predictor = _held_out(loaded, "predictor", 0.25)
    _, static = _held_out(loaded, "static", 0.25)
    assert predictor > static > 0.25 * 0.5                       # both above chance's scale, the predictor ahead
