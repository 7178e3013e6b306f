"""sam_viz.figures: every figure on a causal LM, an encoder and an MoE model; the cell budget counted
on the serialised figure; the firing heatmap's marking and orders checked against the recorded trace;
titles that fit a half-width column, true and distinct ticks, axes and colour scales fit to the data."""
import base64
import dataclasses
import html
import math
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from sam_viz import RunSpec, analyze, density_sweep, firing_counts, mass_curve
from sam_viz.figures import firing as P
from sam_viz.figures import quality as Q
from sam_viz.figures import routing as R
from sam_viz.figures import speed as S

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
    yield Q.density_per_layer(a)
    yield Q.activation_histogram(a)
    yield Q.activation_histogram(a, dense=False, bins=20)
    yield Q.mass_curve_plot(mass_curve(a, DENSITIES), DENSITIES)
    yield Q.sweep_plot(sweep_rows)
    yield Q.divergence_plot(a)
    yield Q.next_token_plot(a)
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
    values with the recorded h; the click layer (one scatter trace per status) has one point per cell."""
    trace, lf = fig.data[0], a.layers[layer]
    z = np.asarray(trace.z)
    acts = lf.activations.float()
    cells = {(y, x): (click.name, h) for click in fig.data[1:] for x, y, h in zip(click.x, click.y, click.customdata)}
    if not cells:                       # no click layer: the heatmap's own hover carries h; the sign of z, the status
        h = np.asarray(trace.customdata)
        cells = {(y, x): ("expert not routed" if np.isnan(z[i, k]) else "computed" if z[i, k] > 0 else
                          "computed" if z[i, k] == 0 and x in set(lf.token(token_index(y))[0].tolist()) else "dropped",
                          h[i, k]) for i, y in enumerate(trace.y) for k, x in enumerate(trace.x)}
    assert len(cells) == z.size
    for i, label in enumerate(trace.y):
        t = token_index(label)
        assert label == f"{t}: {a.tokens[t]}"
        fired = set(lf.token(t)[0].tolist())
        experts = set(range(max(1, a.n_experts))) if lf.experts is None else set(lf.experts[t].tolist())
        for k, j in enumerate(trace.x):
            routed = j // a.d_ff in experts
            status, h = cells[label, j]
            assert status == ("computed" if j in fired else "dropped" if routed else "expert not routed")
            assert h == pytest.approx(float(acts[t, j]), abs=1e-6)
            if not routed:
                assert np.isnan(z[i, k])
                continue
            assert abs(z[i, k]) == pytest.approx(abs(float(acts[t, j])), abs=1e-6)
            if z[i, k] != 0:
                assert (z[i, k] > 0) == (j in fired)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("clickable", [False, True])
def test_marking_matches_trace(runs, spec, clickable):
    a = runs[spec]
    for order in P.ORDERS:
        fig = P.firing_heatmap(a, 1, order, clickable=clickable).fig
        assert len(set(fig.data[0].x)) == a.n_neurons and len(set(fig.data[0].y)) == len(a.tokens)
        check_marking(a, 1, fig)


def test_heatmap_without_clicks_is_one_trace_and_shows_every_neuron_of_64_tokens():
    """Without a click layer the map is one heatmap trace (Chromium drew the per-cell SVG click layer
    in 3.4-3.9 s, the heatmap alone in 0.3-0.5 s), and the budget its cells no longer share with
    four click values each holds all 1,536 neurons of 64 minilm tokens (it kept 780 before)."""
    m = shared("minilm")
    ids = m.tokenizer(LONG, add_special_tokens=False)["input_ids"][:62]
    a = analyze(m, RunSpec(prompt=m.tokenizer.decode(ids), model="minilm", policy="topk", density=0.5))
    plot = P.firing_heatmap(a, 0)
    assert [t.type for t in plot.fig.data] == ["heatmap"]
    assert len(plot.fig.data[0].x) == a.n_neurons == 1536 and len(plot.fig.data[0].y) == len(a.tokens)
    assert plot.note == "" and count_cells(plot.fig) <= P.MAX_CELLS
    clicks = P.firing_heatmap(a, 0, clickable=True)
    assert {t.type for t in clicks.fig.data[1:]} == {"scattergl"} and count_cells(clicks.fig) <= P.MAX_CELLS


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
    bars = Q.density_per_layer(a).fig.data
    achieved = [float(lf.selected.sum()) / float(lf.possible.sum()) for lf in a.layers]
    assert list(bars[0].y) == pytest.approx(achieved)
    assert list(bars[2].y) == [a.spec.density] * a.n_layers


def test_next_tokens_and_sentences(runs):
    causal = Q.next_token_plot(runs["tiny-llama"]).fig
    assert len(causal.data) == 2 and list(causal.data[0].x) == [r["prob"] for r in runs["tiny-llama"].next_tokens["dense"]]
    assert [a.text for a in causal.layout.annotations[:2]] == ["dense model", "sparse model"]
    named = Q.next_token_plot(runs["tiny-llama"], labels=("all neurons", "30% <of> them"), x_max=0.5).fig
    assert [a.text for a in named.layout.annotations[:2]] == ["all neurons", "30% &lt;of&gt; them"]
    assert list(named.layout.xaxis.range) == list(named.layout.xaxis2.range) == [0, 0.5]
    encoder = Q.next_token_plot(runs["minilm"]).fig
    assert all(len(label) <= 45 for label in encoder.data[0].x)
    assert list(encoder.data[0].y) == [r["cosine"] for r in runs["minilm"].sentence_cosines]


def test_sweep_labels():
    rows = [{"policy": p, "density": d, "achieved_density": d, "metric": "cosine", "value": 1 - d / 10}
            for p in ("topk", "threshold") for d in (0.5, 0.1)]
    fig = Q.sweep_plot(rows).fig
    assert fig.layout.yaxis.title.text == "embedding cosine vs dense"
    assert [t.name for t in fig.data] == ["topk", "threshold"] and list(fig.data[0].x) == [0.1, 0.5]
    assert Q.sweep_plot([]).note


def test_without_activations(runs):
    a = runs["tiny-llama"]
    bare = dataclasses.replace(a, layers=[dataclasses.replace(lf, activations=None) for lf in a.layers],
                               dense_layers=[dataclasses.replace(lf, activations=None) for lf in a.dense_layers])
    for plot in (P.firing_heatmap(bare, 0), P.token_neurons(bare, 0, 0), Q.activation_histogram(bare)):
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
    code = "import sam_viz.figures, sam_viz.figures.firing, sys; assert 'streamlit' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_labels_are_escaped(runs):
    a = runs["tiny-llama"]
    odd = dataclasses.replace(a, tokens=["<b>&"] + a.tokens[1:])
    assert P.firing_heatmap(odd, 0).fig.data[0].y[0] == "0: &lt;b&gt;&amp;"
    assert "&lt;b&gt;" in P.token_neurons(odd, 0, 0).fig.layout.title.text


# ---------------------------------------------------------------------------------- readable figures

COLUMN_PX = 462     # a half-width column at a 1400 px window with the sidebar open (measured in Chromium)
CHAR_EM = 0.55      # average character width in font sizes: a safe bound for Streamlit's UI font, bold too
MODEBAR_PX = 30     # plotly's modebar: 2 px from the top, 26 px high (measured in Chromium)
LINE_EM = 1.2       # a text line's height in font sizes
SUBTITLE_GAP_EM = 1.6   # plotly.js (src/components/titles) sets the subtitle 1.6 of its font sizes below the title
STREAMLIT_REWRITES = re.compile(r'"#0000(?:[0-3][0-9]|40)"', re.I)   # colours Streamlit's theme replaces


def drawn(text: str) -> list[str]:
    """The lines of a plotly title as drawn: split at <br>, tags removed, entities decoded."""
    return [html.unescape(re.sub(r"<[^>]+>", "", line)) for line in re.split(r"<br\s*/?>", text or "") if line]


def every_figure(a, sweep_rows):
    """Every figure function of figures.firing, .quality, .routing and .speed, drawn for analysis a."""
    yield from all_plots(a, sweep_rows)
    yield Q.sweep_plot(sweep_rows, current=0.3)
    yield P.token_neurons(a, a.n_layers - 1, len(a.tokens) - 1, top=40)
    yield R.recall_by_policy({"topk": a})
    yield R.policy_summary({"topk": a})
    yield R.firing_frequency(firing_counts(a, 1), len(a.tokens), 1, "selected by the topk policy on this prompt")
    yield R.firing_frequency(firing_counts(a, 1), 123_456, 11, "in the oracle top-k on calibration text")
    yield R.cofiring(a, 1)
    yield R.router_entropy(a)
    yield R.expert_load(a)
    n = a.n_neurons
    attribution = SimpleNamespace(neurons_dense=[torch.linspace(-1, 1, n)] * a.n_layers,
                                  neurons_sparse=[torch.linspace(1, -1, n)] * a.n_layers,
                                  kept=[torch.zeros(n)] * a.n_layers, tokens=a.tokens,
                                  neuron_noise=[(False, False)] * a.n_layers)
    yield R.neuron_attribution_plot(attribution, 1)
    yield S.forward_bars({"dense_ms": 5.0, "sparse_ms": 4.0, "speedup": 1.25, "tokens": 123, "repeats": 3},
                         {"dense_floor_ms": 0.2, "sparse_floor_ms": 0.05})
    bench = [{"shape": "tinyllama-mlp 2048x5632", "dtype": dtype, "density": d, "ms": 1 + 10 * d, "dense_ms": 10.0,
              "floor_ms": 10 * d, "speedup_vs_dense": 10 / (1 + 10 * d)} for dtype in ("fp32", "bf16")
             for d in (0.05, 0.5)]
    yield S.kernel_ms(bench)
    yield S.kernel_speedup(bench)
    yield S.decode_tokens([{"density": d, "dense_tok_s": 20.0, "sparse_tok_s": 25.0, "f_mlp": 0.6,
                            "ideal_speedup": 1 / (0.4 + 0.6 * d)} for d in (0.1, 0.5)])


@pytest.mark.parametrize("spec", SPECS)
def test_titles_fit_a_half_width_column_below_the_modebar(runs, spec):
    """Each title line fits COLUMN_PX at CHAR_EM x its font size per character; the title hangs from the
    top of the chart below the modebar's band, and the top margin holds the band, the title lines and
    (make_subplots) the panel titles."""
    a = runs[spec]
    rows = density_sweep(shared(spec), a.spec, densities=(0.3, 1.0), policies=("topk",))
    for plot in every_figure(a, rows):
        title = plot.fig.layout.title
        if not title.text:
            assert not plot.fig.data or plot.note      # an empty figure says why instead
            continue
        size, sub_size = title.font.size, title.subtitle.font.size
        assert size and sub_size, title.text           # set on the figure, so no theme changes them
        heads, subs = drawn(title.text), drawn(title.subtitle.text)
        for line, px in [(line, size) for line in heads] + [(line, sub_size) for line in subs]:
            assert len(line) <= COLUMN_PX / (CHAR_EM * px), f"{line!r} does not fit at {px} px"
        panels = any(ann.yanchor == "bottom" and ann.y == 1 for ann in plot.fig.layout.annotations)
        need = MODEBAR_PX + LINE_EM * (size * len(heads) + sub_size * len(subs) + 16 * panels)
        need += SUBTITLE_GAP_EM * sub_size if subs else 0
        assert (title.yref, title.yanchor, title.y) == ("container", "top", 1) and title.pad.t >= MODEBAR_PX
        assert plot.fig.layout.margin.t >= need, title.text


@pytest.mark.parametrize("spec", SPECS)
def test_no_colour_that_streamlit_rewrites(runs, spec):
    """Streamlit's chart theme replaces the colours #000001 to #000040 anywhere in a figure (they are its
    template's placeholders): Magma's first stop, #000004, became a pink band at the bottom of a colour bar."""
    a = runs[spec]
    rows = density_sweep(shared(spec), a.spec, densities=(0.3, 1.0), policies=("topk",))
    for plot in every_figure(a, rows):
        assert not STREAMLIT_REWRITES.search(plot.fig.to_json()), plot.fig.layout.title.text


def label_value(label: str) -> float:
    return float(label.rstrip("%")) / 100


@pytest.mark.parametrize("values", [(0.001, 0.02), (0.0321, 0.0397), (0.18, 0.56), (1e-4, 3e-4), (0.0, 0.0),
                                    (0.2, 1.7)])
def test_divergence_ticks_are_distinct_and_true(runs, values):
    a = dataclasses.replace(runs["tiny-llama"], layer_divergence=list(values))
    axis = Q.divergence_plot(a).fig.layout.yaxis
    labels, ticks = list(axis.ticktext or []), list(axis.tickvals or [])
    assert len(labels) == len(ticks) >= 3 and len(set(labels)) == len(labels)
    for label, tick in zip(labels, ticks):
        decimals = len(label.rstrip("%").partition(".")[2])
        assert abs(label_value(label) - tick) <= 0.5 * 10 ** -(decimals + 2) + 1e-12    # the label reads its value
    assert axis.range[0] <= 0 and max(values) <= ticks[-1] <= axis.range[1]


def with_outlier(a, layer, token, factor=1000.0):
    """a, with one dense activation of (layer, token) replaced by `factor` x the row's largest |h|."""
    acts = a.dense_layers[layer].activations.clone()
    j = int(acts[token].float().abs().argmin())
    acts[token, j] = factor * float(acts[token].float().abs().max())
    dense = list(a.dense_layers)
    dense[layer] = dataclasses.replace(dense[layer], activations=acts)
    return dataclasses.replace(a, dense_layers=dense), j, float(acts[token, j])


@pytest.mark.parametrize("spec", ("tiny-llama", "tiny-mixtral"))
def test_token_detail_axis_is_not_set_by_one_outlier(runs, spec):
    a, layer, token = runs[spec], 1, 2
    plain = P.token_neurons(a, layer, token)
    assert plain.fig.layout.xaxis.range is None and plain.note == ""      # no outlier: the whole bars, no note
    odd, j, big = with_outlier(a, layer, token)
    plot = P.token_neurons(odd, layer, token)
    dense_bar, sparse_bar = plot.fig.data
    assert list(dense_bar.customdata)[0] == j
    lo, hi = plot.fig.layout.xaxis.range
    others = [abs(v) for bar in (dense_bar, sparse_bar) for v in bar.x if abs(v) < big]
    assert max(abs(lo), abs(hi)) < big / 100                              # the outlier does not set the range
    assert max(others) <= max(abs(lo), abs(hi))                           # every other bar is drawn whole
    assert "cut" in plot.note and "1 cut neuron " in plot.note
    assert [ann.text for ann in plot.fig.layout.annotations] == [f"{big:.3g} →"]


@pytest.mark.parametrize("policy", ("topk", "threshold"))
def test_density_grid_colours_span_the_data(policy):
    a = analyze(shared("tiny-llama"), RunSpec(prompt=PROMPT, model="tiny-llama", policy=policy, density=0.3))
    shares = [len(lf.token(t)[0]) / a.n_neurons for lf in a.layers for t in range(len(a.tokens))]
    fig = P.density_tokens_layers(a).fig
    zmin, zmax, sub = fig.data[0].zmin, fig.data[0].zmax, fig.layout.title.subtitle.text
    if policy == "topk":
        k = round(0.3 * a.n_neurons) / a.n_neurons                         # DESIGN: k = round(density * d_ff)
        assert set(shares) == {k} and f"every cell is {k:.3g}" in sub and zmin < k < zmax
    else:
        assert min(shares) < max(shares) and "every cell" not in sub
        assert zmin == pytest.approx(min(shares)) and zmax == pytest.approx(max(shares))
        assert f"{min(shares):.3g} to {max(shares):.3g}" in sub


def test_sweep_marks_the_current_density():
    rows = [{"policy": "topk", "density": d, "achieved_density": d, "metric": "kl", "value": 1 - d} for d in (0.1, 0.5)]
    fig = Q.sweep_plot(rows, current=0.3).fig
    assert [(s.type, s.x0, s.x1) for s in fig.layout.shapes] == [("line", 0.3, 0.3)]
    assert any("0.3" in ann.text for ann in fig.layout.annotations)
    assert not Q.sweep_plot(rows).fig.layout.shapes


def test_router_entropy_has_one_column_per_layer_on_the_whole_scale(runs):
    a = runs["tiny-mixtral"]
    fig = R.router_entropy(a).fig
    heat = fig.data[0]
    assert fig.layout.xaxis.type == "category" and list(heat.x) == list(range(a.n_layers))
    assert list(fig.layout.xaxis.tickvals) == list(range(a.n_layers))
    assert heat.zmin == 0 and heat.zmax == pytest.approx(math.log(a.n_experts))   # both ends fixed: no auto scale
    assert np.asarray(heat.z).max() <= math.log(a.n_experts) + 1e-6


def test_expert_load_puts_layer_0_on_top(runs):
    a = runs["tiny-mixtral"]
    fig = R.expert_load(a).fig
    heat = fig.data[0]
    assert list(heat.y) == [f"layer {i}" for i in range(a.n_layers)]
    assert fig.layout.yaxis.autorange == "reversed"                      # first category at the top
    for i, lf in enumerate(a.layers):
        picks = [e for row in lf.experts.tolist() for e in row]
        assert list(heat.z[i]) == pytest.approx([picks.count(e) / len(a.tokens) for e in range(a.n_experts)])
    assert (heat.zmin, heat.zmax) == (0, 1)


def test_policy_summary_keeps_better_higher_and_better_lower_apart(runs):
    """Recall (higher is better) and the MLP weights read (lower is better) are not bars on one axis:
    the weights read sit in a panel of their own, titled with its direction. Under topk on a GLU model
    the oracle reads every gate and up row to rank, then the down rows it keeps: (2 + density) / 3."""
    a = runs["tiny-llama"]
    fig = R.policy_summary({"topk": a}).fig
    read = [t for t in fig.data if t.name.startswith("MLP weights read")]
    quality = [t for t in fig.data if not t.name.startswith("MLP weights read")]
    assert len(read) == 1 and {t.name for t in quality} == {"recall", "mass kept", "top1 agreement vs dense"}
    assert read[0].y[0] == pytest.approx((2 + a.density) / 3, rel=1e-6)
    assert {t.yaxis for t in quality} == {"y"} and read[0].yaxis == "y2"
    panel = {ann.text for ann in fig.layout.annotations
             if fig.layout.xaxis2.domain[0] <= ann.x <= fig.layout.xaxis2.domain[1]}
    rest = {ann.text for ann in fig.layout.annotations if ann.x < fig.layout.xaxis2.domain[0]}
    assert any("lower is better" in t for t in panel) and any("higher is better" in t for t in rest)


def test_compare_numbers_get_names_and_formats():
    from sam_viz.analysis import describe_compare

    rows = describe_compare({"kl": 0.012345, "top1_agreement": 13 / 14, "cosine": 0.99871, "max_abs_diff": float("nan"),
                             "other_metric": 2.0})
    assert [(name, value) for name, value, _ in rows] == [
        ("KL divergence", "0.0123 nats"), ("Top-1 agreement", "92.9%"), ("Embedding cosine", "0.9987"),
        ("Largest hidden-state difference", "n/a"), ("other metric", "2")]
    assert all(meaning for _, _, meaning in rows[:4])


def test_a_dense_runs_heatmap_speaks_of_no_dropped_neuron():
    """A dense run computes every neuron: its title, subtitle and colour bar name no dropped cell and
    no sparse model (the colour bar once read "1e-06 dropped"); a sparse run's keep the two sides."""
    def words(fig) -> str:
        bar = fig.data[0].colorbar
        return " ".join([fig.layout.title.text, *map(str, bar.ticktext), fig.data[0].hovertemplate]).lower()

    dense = analyze(shared("tiny-llama"), RunSpec(prompt=PROMPT, model="tiny-llama", policy="dense"))
    fig = P.firing_heatmap(dense, 0).fig
    assert "dropped" not in words(fig) and "sparse" not in words(fig)
    assert fig.data[0].zmin == 0 and min(fig.data[0].colorbar.tickvals) == 0
    sparse = P.firing_heatmap(analyze(shared("tiny-llama"), RunSpec(prompt=PROMPT, model="tiny-llama", density=0.3)), 0).fig
    assert "dropped" in words(sparse) and sparse.data[0].zmin < 0
