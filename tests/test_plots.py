"""sam_viz.plots: every figure on a causal LM, an encoder and an MoE model; the cell budget counted
on the serialised figure; the firing heatmap's marking and orders checked against the recorded trace."""
import base64
import dataclasses
import subprocess
import sys

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from sam_viz import RunSpec, analyze, density_sweep, mass_curve
from sam_viz import plots as P

from conftest import shared

PROMPT = "The cat sat on the mat. It was warm. Then it slept."
LONG = " ".join(["A lighthouse keeper counted the ships that passed during the long winter storm."] * 33)
SPECS = ("tiny-llama", "minilm", "tiny-mixtral")
DENSITIES = (0.1, 0.3, 0.5, 1.0)


@pytest.fixture(scope="module")
def runs():
    return {spec: analyze(shared(spec), RunSpec(prompt=PROMPT, model=spec, policy="topk", density=0.3))
            for spec in SPECS}


@pytest.fixture(scope="module")
def long_run():
    a = analyze(shared("minilm"), RunSpec(prompt=LONG, model="minilm", policy="topk", density=0.3))
    assert 450 <= len(a.tokens) <= 512 and a.has_activations
    return a


def count_cells(fig: go.Figure) -> int:
    """Array values across all traces of the serialised figure (typed arrays decoded, nested lists
    counted leaf by leaf, strings included)."""
    return sum(_count(v) for trace in fig.to_dict()["data"] for v in trace.values())


def _count(v) -> int:
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).size
    if isinstance(v, dict):
        return sum(_count(x) for x in v.values())
    if isinstance(v, np.ndarray):
        return v.size
    if isinstance(v, (list, tuple)):
        return sum(_count(x) if isinstance(x, (list, tuple, dict, np.ndarray)) else 1 for x in v)
    return 0


def all_plots(a, sweep_rows):
    yield P.firing_heatmap(a, 0)
    yield P.firing_heatmap(a, a.n_layers - 1, "frequency")
    yield P.firing_heatmap(a, 1, "clustered")
    yield P.token_neurons(a, 1, 3)
    yield P.density_tokens_layers(a)
    yield P.density_per_layer(a)
    yield P.activation_histogram(a)
    yield P.activation_histogram(a, dense=False, bins=20)
    yield P.mass_curve_plot(mass_curve(a, DENSITIES), DENSITIES)
    yield P.sweep_plot(sweep_rows)
    yield P.divergence_plot(a)
    yield P.next_token_plot(a)
    yield P.expert_heatmap(a, 0)


@pytest.mark.parametrize("spec", SPECS)
def test_every_figure(runs, spec):
    a = runs[spec]
    rows = density_sweep(shared(spec), a.spec, densities=(0.3, 1.0), policies=("topk",))
    for plot in all_plots(a, rows):
        assert isinstance(plot, P.Plot) and isinstance(plot.fig, go.Figure)
        assert isinstance(plot.note, str) and plot.note.count(".") <= 2
        assert count_cells(plot.fig) <= P.MAX_CELLS
        plot.fig.to_json()
    moe = P.expert_heatmap(a, 0)
    assert (len(moe.fig.data) > 0) == (a.n_experts > 0) and (moe.note == "") == (a.n_experts > 0)


def test_expert_heatmap_weights(runs):
    a = runs["tiny-mixtral"]
    lf = a.layers[1]
    z = np.asarray(P.expert_heatmap(a, 1).fig.data[0].z)
    assert z.shape == (len(a.tokens), a.n_experts)
    for t in range(len(a.tokens)):
        for e, w in zip(lf.experts[t].tolist(), lf.expert_weights[t].tolist()):
            assert z[t, e] == pytest.approx(w, abs=1e-3)
        assert (z[t] > 0).sum() == lf.experts.shape[1]


@pytest.mark.parametrize("order", P.ORDERS)
def test_budget_on_long_prompt(long_run, order):
    plot = P.firing_heatmap(long_run, 2, order)
    n = count_cells(plot.fig)
    assert P.MAX_CELLS // 2 < n <= P.MAX_CELLS
    assert "most active of 1,536 neurons" in plot.note and "200,000" in plot.note
    small = P.firing_heatmap(long_run, 2, order, max_cells=500)
    assert count_cells(small.fig) <= 500
    assert "neurons" in small.note and "tokens" in small.note and "500" in small.note
    check_marking(long_run, 2, small.fig)


def test_density_grid_budget(long_run):
    full = P.density_tokens_layers(long_run)
    assert count_cells(full.fig) <= P.MAX_CELLS and full.note == ""
    assert np.asarray(full.fig.data[0].z).shape == (len(long_run.tokens), long_run.n_layers)
    small = P.density_tokens_layers(long_run, max_cells=500)
    assert count_cells(small.fig) <= 500 and "tokens" in small.note and "500" in small.note


def token_index(label: str) -> int:
    return int(label.split(":", 1)[0])


def check_marking(a, layer, fig):
    """Each shown cell's category and sign agree with the recorded CSR trace (and MoE routing), its
    values with the recorded h."""
    trace, lf = fig.data[0], a.layers[layer]
    z, h, status = np.asarray(trace.z), np.asarray(trace.customdata), np.asarray(trace.text)
    acts = lf.activations.float()
    for i, label in enumerate(trace.y):
        t = token_index(label)
        assert label == f"{t}: {a.tokens[t]}"
        fired = set(lf.token(t)[0].tolist())
        experts = set(range(max(1, a.n_experts))) if lf.experts is None else set(lf.experts[t].tolist())
        for k, j in enumerate(trace.x):
            routed = j // a.d_ff in experts
            assert status[i, k] == ("computed" if j in fired else "dropped" if routed else "expert not routed")
            assert h[i, k] == pytest.approx(float(acts[t, j]), abs=1e-6)
            if not routed:
                assert np.isnan(z[i, k])
                continue
            assert abs(z[i, k]) == pytest.approx(abs(float(acts[t, j])), abs=1e-6)
            if z[i, k] != 0:
                assert (z[i, k] > 0) == (j in fired)


@pytest.mark.parametrize("spec", SPECS)
def test_marking_matches_trace(runs, spec):
    a = runs[spec]
    for order in P.ORDERS:
        fig = P.firing_heatmap(a, 1, order).fig
        assert len(set(fig.data[0].x)) == a.n_neurons and len(set(fig.data[0].y)) == len(a.tokens)
        check_marking(a, 1, fig)


def selection_counts(layer, n):
    ids = torch.cat([layer.token(t)[0].long() for t in range(len(layer.selected))])
    return torch.bincount(ids, minlength=n)


@pytest.mark.parametrize("spec", ("tiny-llama", "minilm"))
def test_orders(runs, long_run, spec):
    for a in (runs[spec], long_run):
        counts = selection_counts(a.layers[1], a.n_neurons)
        index_x = list(P.firing_heatmap(a, 1, "index").fig.data[0].x)
        freq_x = list(P.firing_heatmap(a, 1, "frequency").fig.data[0].x)
        clus_x = list(P.firing_heatmap(a, 1, "clustered").fig.data[0].x)
        assert index_x == sorted(index_x)
        assert all(counts[i] >= counts[j] for i, j in zip(freq_x, freq_x[1:]))
        assert sorted(freq_x) == sorted(clus_x) == index_x


def test_reduction_keeps_most_active(long_run):
    x = P.firing_heatmap(long_run, 0, "index", max_cells=20_000).fig.data[0].x
    mass = long_run.layers[0].activations.float().abs().sum(0)
    assert sorted(x) == sorted(torch.topk(mass, len(x)).indices.tolist())


@pytest.mark.parametrize("spec", SPECS)
def test_token_neurons(runs, spec):
    a, layer, t = runs[spec], 1, 4
    fig = P.token_neurons(a, layer, t, top=12).fig
    dense_bar, sparse_bar = fig.data
    ids = list(dense_bar.customdata)
    hd = a.dense_layers[layer].activations[t].float()
    assert len(ids) == 12
    assert np.allclose(dense_bar.x, hd[ids].numpy())
    assert sorted(hd.abs()[ids].tolist(), reverse=True) == pytest.approx(torch.topk(hd.abs(), 12).values.tolist())
    sel_ids, sel_vals = a.layers[layer].token(t)
    used = dict(zip(sel_ids.tolist(), sel_vals.float().tolist()))
    for j, label, hs in zip(ids, dense_bar.y, sparse_bar.x):
        assert label.endswith("(dropped)") == (j not in used)
        assert hs == pytest.approx(used.get(j, 0.0))


@pytest.mark.parametrize("spec", SPECS)
def test_density_per_layer(runs, spec):
    a = runs[spec]
    bars = P.density_per_layer(a).fig.data
    achieved = [float(lf.selected.sum()) / float(lf.possible.sum()) for lf in a.layers]
    assert list(bars[0].y) == pytest.approx(achieved)
    assert list(bars[2].y) == [a.spec.density] * a.n_layers


def test_next_tokens_and_sentences(runs):
    causal = P.next_token_plot(runs["tiny-llama"]).fig
    assert len(causal.data) == 2 and list(causal.data[0].x) == [r["prob"] for r in runs["tiny-llama"].next_tokens["dense"]]
    encoder = P.next_token_plot(runs["minilm"]).fig
    assert all(len(label) <= 45 for label in encoder.data[0].x)
    assert list(encoder.data[0].y) == [r["cosine"] for r in runs["minilm"].sentence_cosines]


def test_sweep_labels():
    rows = [{"policy": p, "density": d, "achieved_density": d, "metric": "cosine", "value": 1 - d / 10}
            for p in ("topk", "threshold") for d in (0.5, 0.1)]
    fig = P.sweep_plot(rows).fig
    assert fig.layout.yaxis.title.text == "embedding cosine vs dense"
    assert [t.name for t in fig.data] == ["topk", "threshold"] and list(fig.data[0].x) == [0.1, 0.5]
    assert P.sweep_plot([]).note


def test_without_activations(runs):
    a = runs["tiny-llama"]
    bare = dataclasses.replace(a, layers=[dataclasses.replace(lf, activations=None) for lf in a.layers],
                               dense_layers=[dataclasses.replace(lf, activations=None) for lf in a.dense_layers])
    for plot in (P.firing_heatmap(bare, 0), P.token_neurons(bare, 0, 0), P.activation_histogram(bare)):
        assert plot.note == P.NO_ACTIVATIONS and len(plot.fig.data) == 0
    assert P.density_tokens_layers(bare).note == ""


def test_bad_input(runs):
    a = runs["tiny-llama"]
    with pytest.raises(ValueError, match="order"):
        P.firing_heatmap(a, 0, "random")
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        P.firing_heatmap(a, 9)
    with pytest.raises(ValueError, match="token"):
        P.token_neurons(a, 0, len(a.tokens))


def test_no_streamlit_import():
    code = "import sam_viz.plots, sys; assert 'streamlit' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_labels_are_escaped(runs):
    a = runs["tiny-llama"]
    odd = dataclasses.replace(a, tokens=["<b>&"] + a.tokens[1:])
    assert P.firing_heatmap(odd, 0).fig.data[0].y[0] == "0: &lt;b&gt;&amp;"
    assert "&lt;b&gt;" in P.token_neurons(odd, 0, 0).fig.layout.title.text
