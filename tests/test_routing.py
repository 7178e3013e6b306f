"""Routing: the static baseline, the learned predictor (Deja Vu), recall / precision against the
oracle top-k, stored calibrations, and the cost the predictor adds."""
import json

import pytest
import torch

from conftest import HELD_OUT, model_output, shared
from sam_viz import RunSpec, analyze
from sam_viz.cli import main
from sam_viz.sparse_ops import Policy, Recorder, calibration, calibration_texts, get_calibration, sparsified


def test_calibration_texts_are_split_and_sized():
    texts = calibration_texts()
    train, held = texts["train"], texts["held_out"]
    assert len(train) + len(held) >= 200 and len(held) >= 40
    assert not set(train) & set(held)
    assert not set(HELD_OUT) & set(train)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-mixtral"])
def test_static_selects_one_set_for_every_token(spec):
    m = shared(spec)
    a = analyze(m, RunSpec(prompt=HELD_OUT[0], model=spec, policy="static", density=0.25))
    for layer in a.layers:
        sets = {tuple(sorted(layer.token(t)[0].tolist())) for t in range(len(a.tokens))}
        if m.n_experts:      # one set per expert: a token's set is the union of its experts' sets
            per_expert = {}
            for t in range(len(a.tokens)):
                for e in layer.experts[t].tolist():
                    ids = [i for i in layer.token(t)[0].tolist() if i // m.d_ff == e]
                    per_expert.setdefault(e, set()).add(tuple(sorted(ids)))
            assert all(len(v) == 1 for v in per_expert.values())
        else:
            assert len(sets) == 1
        assert set(layer.selected.tolist()) == {round(0.25 * m.d_ff) * max(1, m.experts_per_token)}


def test_static_set_is_the_most_frequent_oracle_neurons():
    """Independently: count, over the train texts' dense activations, how often each neuron is in
    the top-k, and compare with the static set of layer 0."""
    m = shared("tiny-llama")
    cal = get_calibration(m)
    k = round(0.25 * m.d_ff)
    captured = []
    mlp = m.layers[0].mlp.dense
    handle = mlp.register_forward_pre_hook(lambda mod, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        for text in calibration_texts()["train"]:
            with torch.no_grad():
                m.model(**m.encode(text))
    finally:
        handle.remove()
    x = torch.cat(captured)
    h = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    counts = torch.zeros(m.d_ff)
    for row in h.abs():
        counts[torch.argsort(-row, stable=True)[:k]] += 1
    expected = set(torch.argsort(-counts, stable=True)[:k].tolist())
    got = set(cal.static_ids((0, -1), 0.25, k).tolist())
    assert len(got & expected) >= k - 2          # ties at the boundary may order differently


@pytest.mark.parametrize("policy", ["predictor", "static"])
@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2", "tiny-mixtral"])
def test_every_policy_equals_dense_at_density_one(spec, policy, fresh):
    m, unpatched = shared(spec), fresh(spec)
    enc = m.encode(HELD_OUT[4])
    with torch.no_grad(), sparsified(m, Policy(policy, 1.0)):
        got = model_output(m, enc)
    assert (got - model_output(unpatched, enc).detach()).abs().max() <= 1e-5


def _held_out_recall(m, policy, density):
    hits = oracle = 0
    for text in calibration_texts()["held_out"][:20]:
        rec = Recorder()
        with torch.no_grad(), sparsified(m, Policy(policy, density), recorder=rec):
            m.model(**m.encode(text))
        for layer in rec.layers(len(m.encode(text)["input_ids"][0]), m.d_ff * max(1, m.n_experts)):
            hits += int(layer.hits.sum())
            oracle += int(layer.oracle.sum())
    return hits / oracle


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-mixtral"])
def test_predictor_beats_static_recall_on_held_out_text(spec):
    m = shared(spec)
    for density in (0.1, 0.25):
        predictor, static = _held_out_recall(m, "predictor", density), _held_out_recall(m, "static", density)
        assert predictor > static, (density, predictor, static)
    assert _held_out_recall(m, "topk", 0.25) == 1.0


def test_recall_and_precision_against_an_oracle_written_here():
    """recall = |S ∩ O| / |O|, precision = |S ∩ O| / |S|, O the top round(d * d_ff) by |h| of the
    same layer input, recomputed here from the trace's activations (fp16, so ties may differ)."""
    m = shared("tiny-gpt2")
    a = analyze(m, RunSpec(prompt=HELD_OUT[5], model="tiny-gpt2", policy="threshold", density=0.3))
    k = round(0.3 * m.d_ff)
    for layer in a.layers:
        hits = 0
        for t in range(len(a.tokens)):
            oracle = set(torch.argsort(-layer.activations[t].float().abs(), stable=True)[:k].tolist())
            hits += len(set(layer.token(t)[0].tolist()) & oracle)
        assert layer.recall == pytest.approx(hits / (k * len(a.tokens)), abs=0.01)
        assert layer.precision == pytest.approx(hits / int(layer.selected.sum()), abs=0.01)
        assert 0.3 < layer.recall < 1


def test_calibration_is_stored_keyed_and_reused(monkeypatch):
    m = shared("tiny-qwen2")
    first = get_calibration(m)
    path = calibration.path_for(m)
    assert path.is_file() and path.suffix == ".safetensors"
    assert path.read_bytes()[:8] != b"\x80\x04\x95"          # not a pickle
    calibration._CALIBRATIONS.clear()                          # a new process: nothing in memory

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although a calibration was stored")

    monkeypatch.setattr(calibration, "train_predictor", no_training)
    again = get_calibration(m)
    for unit, (a, b, bias) in first.predictors.items():
        assert torch.equal(again.predictors[unit][0], a) and torch.equal(again.predictors[unit][2], bias)
    assert again.thresholds.keys() == first.thresholds.keys()
    # other settings or other weights: another key
    assert calibration.path_for(m, calibration.Settings(rank=8)) != path
    assert calibration.path_for(shared("tiny-llama")) != path


def test_predictor_cost_is_counted():
    m = shared("tiny-llama")
    a = analyze(m, RunSpec(prompt=HELD_OUT[1], model="tiny-llama", policy="predictor", density=0.25))
    cal = get_calibration(m)
    d, r, d_ff = 64, cal.predictors[(0, -1)][0].shape[0], m.d_ff
    assert r == 8                                  # rank: d / 8
    per_call = r * d + d_ff * r + d_ff
    assert a.cost["predictor_params"] == m.n_layers * per_call
    selected = 0.25 * d_ff * 3 * d * m.n_layers
    assert a.cost["sparse_params"] == pytest.approx(selected + m.n_layers * per_call)
    assert a.cost["sparse_flops"] == 2 * a.cost["sparse_params"]
    assert a.cost["dense_params"] == m.n_layers * d_ff * 3 * d


def test_cli_calibrate_then_analyze_reports_recall(capsys):
    assert main(["calibrate", "--model", "tiny-opt"]) == 0
    assert "calibrated" in capsys.readouterr().out
    assert main(["analyze", "--model", "tiny-opt", "--prompt", HELD_OUT[2], "--policy", "predictor",
                 "--density", "0.25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for layer in out["layers"]:
        assert 0 <= layer["recall"] <= 1 and 0 <= layer["precision"] <= 1
    assert main(["calibrate", "--model", "tiny-opt"]) == 0
    assert "already calibrated" in capsys.readouterr().out
