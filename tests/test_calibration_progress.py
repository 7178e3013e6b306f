"""What a first calibration tells the user while it trains: every step in words, counted the way a
person counts (batch 3 of 15, layer 3 of 6), in order, with a share done that only grows."""
import math

import pytest

from sam_viz.sparse_ops import calibration

TEXTS = 40                                  # calibration texts used here: 3 batches of 16


@pytest.fixture
def few_texts(monkeypatch):
    """Fewer texts and training steps than the real calibration, only so the test is quick. The
    model is loaded afresh (thresholds are cached per model), so no shared model sees this one."""
    texts = calibration.calibration_texts()
    monkeypatch.setattr(calibration, "calibration_texts", lambda: {**texts, "train": texts["train"][:TEXTS]})


def labels_of(loaded, thresholds):
    seen = []
    calibration.calibrate(loaded, calibration.Settings(steps=2), lambda f, t: seen.append((f, t)),
                          thresholds=thresholds)
    return seen


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-mixtral"])
def test_progress_names_every_batch_and_every_layer(spec, fresh, few_texts):
    loaded = fresh(spec)
    seen = labels_of(loaded, thresholds=spec == "tiny-llama")
    fracs, texts = [f for f, _ in seen], [t for _, t in seen]
    assert fracs == sorted(fracs) and fracs[0] == 0.0 and fracs[-1] == 1.0

    batches = math.ceil(TEXTS / 16)
    collecting = [t for t in texts if t.startswith("Collecting")]
    assert collecting == [f"Collecting activations on the calibration text (batch {b} of {batches})"
                          for b in range(1, batches + 1)]

    n = loaded.n_layers
    experts = [f", expert {e} of {loaded.n_experts}" for e in range(1, loaded.n_experts + 1)] or [""]
    training = [t for t in texts if t.startswith("Training")]
    assert training == [f"Training the predictor for layer {l} of {n}{e}" for l in range(1, n + 1) for e in experts]
    assert texts.count("Choosing the static sets") == 1
    assert texts.index("Choosing the static sets") > texts.index(training[-1])

    grid = [t for t in texts if t.startswith("Calibrating thresholds")]
    if spec == "tiny-llama":                  # the CLI's full calibration: thresholds on the density grid too
        assert grid == [f"Calibrating thresholds (density {g:g}, {i} of {len(calibration.GRID)})"
                        for i, g in enumerate(calibration.GRID, 1)]
    else:
        assert grid == []

