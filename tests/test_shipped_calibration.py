"""The built-in models open with a calibration shipped in sparse_ops/data/calibrations (made by
`python -m sam_viz calibrate`), so no class waits for one: found by the same fingerprint as the
cache (weights, settings, texts), and checked here as a calibration of that model: thresholds hit
their density on held-out text, the predictor ranks the oracle's neurons better than the static set.
The demo models also ship the whole-model scope's input calibration (`calibrate --scope all`), found
the same way: its thresholds keep their density of projection inputs collected here by hooks."""
import pytest
import torch

from sam_viz.models import load_model
from sam_viz.sparse_ops import Policy, Recorder, sparsified
from sam_viz.sparse_ops import calibration as C
from sam_viz.sparse_ops import input_calibration as IC

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


# -- the whole-model scope's input calibration (teal, wina), shipped beside the MLP's ------------------

@pytest.mark.parametrize("spec", ("demo-lm", "demo-lm-dense"))
def test_a_demo_model_has_its_input_calibration_without_calibrating(spec, empty_cache):
    loaded = load_model(spec)
    path = IC.path_for(loaded)
    assert (C.SHIPPED / path.name).is_file(), (
        f"no shipped input calibration matches {spec}'s weights and texts: run `python -m sam_viz calibrate "
        f"--scope all --model {spec}` and copy the file from the cache into sparse_ops/data/calibrations")
    cal = IC.get_input_calibration(loaded, train=False)
    assert cal is not None and not path.exists()                  # read from the package, nothing calibrated
    assert cal.fingerprint == IC.fingerprint(loaded, IC.InputSettings(), IC.corpus_key(None))   # these weights
    assert cal.projections == ("q", "k", "v", "o", "gate", "up", "down")
    assert sorted(cal.paths) == ["teal", "wina"] and len(cal.paths["teal"]) == loaded.n_layers


@pytest.mark.parametrize("spec", ("demo-lm", "demo-lm-dense"))
def test_the_shipped_input_thresholds_keep_their_density_of_the_calibration_text(spec, empty_cache):
    """Inputs of q and down collected here by hooks over the calibration text: the share of entries with
    |x| (teal) or |x| * ||W[:, i]|| (wina) above the shipped threshold is the grid density it was set for."""
    loaded = load_model(spec)
    cal = IC.get_input_calibration(loaded, train=False)
    mods = IC.projection_modules(loaded)
    seen = {(i, p): [] for i in range(loaded.n_layers) for p in ("q", "down")}
    hooks = [mods[i][p].register_forward_pre_hook(lambda m, args, key=(i, p): seen[key].append(args[0][0].abs()))
             for i, p in seen]
    try:
        with torch.no_grad():
            for text in C.calibration_texts()["train"][:40]:
                loaded.model(**loaded.encode(text))
    finally:
        for h in hooks:
            h.remove()
    for (i, p), xs in seen.items():
        x = torch.cat(xs)                                                         # [tokens, d_in]
        weight = mods[i][p].weight
        wina = x * weight.detach().float().norm(dim=0)
        for density in (0.25, 0.5):
            assert abs(float((x > cal.threshold_at(i, p, density, "teal")).float().mean()) - density) < 0.04
            assert abs(float((wina > cal.threshold_at(i, p, density, "wina")).float().mean()) - density) < 0.04
