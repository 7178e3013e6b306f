"""Calibration of the input policies teal and wina (issue 22; sparse_ops/input_calibration.py and
sparse_ops/allocation.py), against independent references: thresholds as numpy quantiles of the
inputs that the test's own forward pre-hooks collect on a fresh tiny Llama, the WINA score by hand,
the block error by hand, and the greedy against brute force over the same grid."""
from __future__ import annotations

import functools
import itertools
import math
import threading

import numpy as np
import pytest
import torch

from sam_viz import cli
from sam_viz.models import InputError, load_model
from sam_viz.sparse_ops import input_calibration as ic
from sam_viz.sparse_ops import install
from sam_viz.sparse_ops.allocation import greedy_path, weighted_density
from sam_viz.sparse_ops.calibration import GRID

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = [f"Note {i}: the {w} train left the {w} station at {i} past nine, and the driver waved to the "
        f"{i * 7} people on the platform." for i, w in enumerate(["red", "slow", "night", "mail", "coal"] * 2)]
FAST = ic.InputSettings(step=0.25, error_tokens=10_000)        # few greedy steps; the error on every window
PROJ_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def _windows() -> torch.Tensor:
    loaded = load_model("tiny-llama")
    ids = np.concatenate([loaded.plain_ids(t) for t in TEXT])
    return torch.from_numpy(ids[: len(ids) // 24 * 24].reshape(-1, 24))     # [W, 24] token windows


@functools.lru_cache(maxsize=None)
def _calibrated():
    """A calibration of a tiny Llama whose MLPs are wrapped (SparseMLP), on fixed windows."""
    loaded = load_model("tiny-llama")
    install(loaded)
    windows = _windows()
    return ic.calibrate_inputs(loaded, FAST, windows=windows, corpus={"source": "notes"}), windows


def _module(model, layer: int, proj: str):
    obj = model.model.layers[layer]
    for part in PROJ_PATHS[proj].split("."):
        obj = getattr(obj, part)
    return obj


def _inputs_by_hand(windows: torch.Tensor) -> dict[tuple[int, str], np.ndarray]:
    """{(layer, projection): x [n, d_in]} from plain forward pre-hooks on a fresh, unwrapped model."""
    model = load_model("tiny-llama").model
    got, hooks = {}, []
    for layer in range(len(model.model.layers)):
        for proj in PROJ_PATHS:
            hooks.append(_module(model, layer, proj).register_forward_pre_hook(
                lambda m, a, key=(layer, proj): got.setdefault(key, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v).numpy().astype(np.float64) for k, v in got.items()}


def _quantile_threshold(scores: np.ndarray, g: float) -> float:
    """The value with k = round(g n) of the n scores above it: numpy's inverted-CDF quantile just
    below the (n - k)/n level."""
    n = scores.size
    k = round(g * n)
    return float(np.quantile(scores.ravel(), (n - k - 0.5) / n, method="inverted_cdf"))


def test_thresholds_are_numpy_quantiles_of_the_inputs_teal_and_wina():
    cal, windows = _calibrated()
    x = _inputs_by_hand(windows)
    weights = {key: _module(load_model("tiny-llama").model, *key).weight.detach().numpy().astype(np.float64)
               for key in x}
    assert cal.n_tokens == windows.numel()
    for (layer, proj), xs in x.items():
        colnorm = np.sqrt((weights[(layer, proj)] ** 2).sum(axis=0))           # ||W[:, i]||_2, W [d_out, d_in]
        for kind, scores in (("teal", np.abs(xs)), ("wina", np.abs(xs) * colnorm)):
            for g in GRID[:-1]:
                want = _quantile_threshold(scores, g)
                assert cal.threshold_at(layer, proj, g, kind) == pytest.approx(want, rel=1e-5, abs=1e-7)
            assert cal.threshold_at(layer, proj, 1.0, kind) == -math.inf
            t, k = cal.threshold(layer, proj, 0.5, "uniform", kind), round(0.5 * scores.size)
            assert (scores > t * (1 + 1e-6)).sum() <= k <= (scores >= t * (1 - 1e-6)).sum()   # k above, up to ties
            mid = (_quantile_threshold(scores, 0.5) + _quantile_threshold(scores, 0.55)) / 2   # off the grid
            assert cal.threshold_at(layer, proj, 0.525, kind) == pytest.approx(mid, rel=1e-5)


def test_block_error_is_the_layer_outputs_relative_squared_error_with_hand_made_masks():
    cal, windows = _calibrated()
    model = load_model("tiny-llama").model
    for kind, allocation, layer in (("teal", "uniform", 0), ("wina", "greedy", 1), ("teal", "greedy", 1)):
        outs = {}
        for masked in (False, True):
            hooks = [model.model.layers[layer].register_forward_hook(
                lambda m, a, out, masked=masked: outs.__setitem__(masked, out[0] if isinstance(out, tuple) else out))]
            if masked:
                for proj in PROJ_PATHS:
                    module = _module(model, layer, proj)
                    t = cal.threshold(layer, proj, 0.5, allocation, kind)
                    colnorm = module.weight.detach().pow(2).sum(0).sqrt() if kind == "wina" else torch.ones(1)
                    hooks.append(module.register_forward_pre_hook(
                        lambda m, a, t=t, c=colnorm: (a[0] * (a[0].abs() * c > t),)))
            try:
                with torch.no_grad():
                    model(input_ids=windows, use_cache=False)
            finally:
                for h in hooks:
                    h.remove()
        want = float(((outs[True] - outs[False]).double() ** 2).sum() / (outs[False].double() ** 2).sum())
        assert cal.block_error_at(layer, 0.5, allocation, kind) == pytest.approx(want, rel=1e-4)


def test_greedy_hits_the_target_and_its_block_error_is_at_most_uniforms():
    cal, _ = _calibrated()
    floor = 1 - int(0.95 / FAST.step + 1e-9) * FAST.step                    # the greedy's last state: 0.25
    for kind in ic.KINDS:
        for layer in range(2):
            for g in GRID:
                dens = cal.densities(layer, g, "greedy", kind)
                assert all(floor - 1e-9 <= d <= 1 for d in dens.values())
                if g >= floor:
                    assert cal.weighted_density(layer, dens) == pytest.approx(g, abs=1e-9)
                    assert cal.block_error_at(layer, g, "greedy", kind) <= cal.block_error_at(layer, g, "uniform", kind)


# ---------------------------------------------------------------------------------- the greedy, without a model

def test_each_greedy_step_is_the_best_one_step_move_by_enumeration():
    """A non-separable error: every move on the path is the argmin, over the one-step moves that the
    test enumerates itself, of (error after - error before) / weight count (ties: first named)."""
    rng = np.random.default_rng(1)
    names, w = ("q", "k", "o", "up"), {"q": 4096, "k": 1024, "o": 4096, "up": 8192}
    a, b = rng.uniform(0.5, 2, 4), rng.normal(0, 0.5, (4, 4))

    def error(d):
        s = np.array([1 - d[p] for p in names])
        return float(a @ s ** 2 + s @ b @ s + 0.1 * np.sin(7 * s).sum())

    path = greedy_path(error, w, step=0.2, floor=0.2)
    assert path.densities[-1] == (0.2,) * 4 and len(path.moved) == 4 * 4
    for i, moved in enumerate(path.moved):
        before = dict(zip(names, path.densities[i]))
        costs = []
        for j, p in enumerate(names):
            if before[p] - 0.2 >= 0.2 - 1e-9:
                after = {**before, p: round(before[p] - 0.2, 10)}
                costs.append(((error(after) - error(before)) / w[p], j))
        assert moved == min(costs)[1]
        assert path.errors[i + 1] == pytest.approx(error(dict(zip(names, path.densities[i + 1]))))


def test_on_a_separable_convex_error_every_greedy_state_is_the_brute_force_optimum():
    """Error = sum of per-projection step costs (>= 0, growing as the density falls). For every state
    on the greedy path, no grid state whose weighted density is at most its own has a lower error
    (brute force over all 5^4 grid states); and the read-off at a target hits it exactly."""
    rng = np.random.default_rng(0)
    names = ("q", "k", "v", "down")
    weights = dict(zip(names, (int(v) for v in rng.integers(1, 10, 4) * 512)))
    costs = {p: np.sort(rng.uniform(0, 1, 4)) for p in names}             # step k's cost, growing with k
    levels = (1.0, 0.8, 0.6, 0.4, 0.2)

    def error(d):
        return float(sum(costs[p][:round((1 - d[p]) / 0.2)].sum() for p in names))

    path = greedy_path(error, weights, step=0.2, floor=0.2)
    states = list(itertools.product(levels, repeat=len(names)))
    w = [weights[p] for p in names]
    table = [(weighted_density(s, w), error(dict(zip(names, s)))) for s in states]
    for i in range(len(path.densities)):
        best = min(e for wd, e in table if wd <= path.weighted(i) + 1e-12)
        assert path.errors[i] == pytest.approx(best, abs=1e-12)
    for target in np.linspace(0.2, 1.0, 17):
        assert weighted_density(list(path.at(target).values()), w) == pytest.approx(target, abs=1e-12)


# ---------------------------------------------------------------------------------- storage, hooks, CLI

def test_cache_round_trip(tmp_path, monkeypatch):
    cal, windows = _calibrated()
    path = tmp_path / "inputs.safetensors"
    ic.save(cal, path)
    back = ic.load(path)
    assert (back.fingerprint, back.settings, back.projections, back.n_tokens, back.corpus, back.source) == (
        cal.fingerprint, cal.settings, cal.projections, cal.n_tokens, cal.corpus, cal.source)
    assert torch.equal(back.weights, cal.weights)
    for kind in ic.KINDS:
        assert torch.equal(back.thresholds[kind], cal.thresholds[kind])
        assert back.paths[kind] == cal.paths[kind]
        for a in ic.ALLOCATIONS:
            assert torch.equal(back.block_error[kind][a], cal.block_error[kind][a])
    assert back.densities(1, 0.45, "greedy", "wina") == cal.densities(1, 0.45, "greedy", "wina")
    assert back.threshold(1, "o", 0.45) == cal.threshold(1, "o", 0.45)


def test_get_input_calibration_stores_and_finds_it_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_CACHE_DIR", str(tmp_path))
    loaded, windows = load_model("tiny-llama"), _windows()[:4]
    corpus = (windows, {"source": "four windows"})
    calls = []
    monkeypatch.setattr(ic, "InputSettings", functools.partial(ic.InputSettings, step=0.5, error_tokens=48))
    first = ic.get_input_calibration(loaded, corpus, lambda f, text: calls.append(text))
    assert calls[-1] == "Input calibration done" and any("Collecting projection inputs on the corpus" in c
                                                         for c in calls)
    assert ic.get_input_calibration(loaded, corpus) is first                      # memory
    assert ic.path_for(loaded, first.settings, windows).is_file()
    monkeypatch.setattr(ic, "calibrate_inputs", lambda *a, **k: pytest.fail("calibrated again"))
    again = ic.get_input_calibration(load_model("tiny-llama"), corpus)             # another model object: disk
    assert again.fingerprint == first.fingerprint and again.paths == first.paths
    assert ic.get_input_calibration(loaded, None, train=False) is None              # the built-in text: not yet


def test_no_hook_is_left_and_other_threads_pass_untouched():
    loaded = load_model("tiny-llama")
    modules = [m for layer in ic.projection_modules(loaded) for m in layer.values()]
    seen = []

    def boom(args):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        with ic.hooked([(modules[0], boom)]):
            ic._forward(loaded, {"input_ids": _windows()[:1], "attention_mask": torch.ones(1, 24, dtype=torch.long)})
    with ic.hooked([(m, lambda args: seen.append(1)) for m in modules]):
        other = threading.Thread(target=ic._forward, args=(loaded, {"input_ids": _windows()[:1]}))
        other.start()
        other.join()
        assert seen == []
    _calibrated()
    for module in loaded.model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_cli_calibrate_scope_all(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAM_VIZ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ic, "InputSettings", functools.partial(ic.InputSettings, step=0.5, error_tokens=48,
                                                               max_tokens=200))
    assert cli.main(["calibrate", "--scope", "all", "--model", "tiny-llama"]) == 0
    out, err = capsys.readouterr()
    assert "[100%] Input calibration done" in err
    lines = out.splitlines()
    assert "input calibration (teal, wina) on the built-in calibration text" in lines[0]
    assert lines[2].split() == ["layer", "kind", "q", "k", "v", "o", "gate", "up", "down", "greedy", "uniform"]
    assert len(lines) == 3 + 2 * 2                                               # 2 layers x 2 kinds
    assert cli.main(["calibrate", "--scope", "all", "--model", "tiny-llama"]) == 0
    out, err = capsys.readouterr()
    assert "(stored; --force calibrates again)" in out and err == "" and out.splitlines()[3:] == lines[3:]
    assert cli.main(["calibrate", "--scope", "all", "--model", "tiny-mixtral"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: teal and wina are not available for the mixture-of-experts model_type 'mixtral'")
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(InputError):
        ic.calibrate_inputs(load_model("tiny-mixtral"))


@pytest.mark.parametrize("policy", ["teal", "wina"])
def test_analyze_under_scope_all_reads_the_stored_calibration(tmp_path, monkeypatch, capsys, policy):
    """The CLI's whole-model teal / wina run finds the calibration `calibrate --scope all` stored, and its
    per-projection input densities are those of the allocation: on the calibration's own kind of text, each
    projection keeps about its allocated share (the thresholds are quantiles of the same distribution)."""
    import json

    monkeypatch.setenv("SAM_VIZ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ic, "InputSettings", functools.partial(ic.InputSettings, step=0.25, error_tokens=48,
                                                               max_tokens=400))
    assert cli.main(["calibrate", "--scope", "all", "--model", "tiny-llama"]) == 0
    capsys.readouterr()
    prompt = "The quick brown fox jumps over the lazy dog. " * 6
    assert cli.main(["analyze", "--model", "tiny-llama", "--scope", "all", "--policy", policy, "--density", "0.5",
                     "--allocation", "uniform", "--prompt", prompt, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scope"] == "all"
    for layer in out["layers"]:
        for name, density in layer["projections"].items():
            assert 0.2 < density < 0.8, (layer["layer"], name, density)   # random weights: loose, but not 0 or 1
    assert 0.3 < out["model_density"] < 0.7
