"""Figures of a corpus profile (sam_viz.profile): PowerInfer's hot-neuron curves (Song et al. 2023,
Fig. 4), the layers x neurons firing-frequency heatmap sorted by frequency, the policy's recall and
precision per layer, and for one neuron, as on a Neuronpedia page, the histogram of h and its logit
effects. Pure functions, a Profile or NeuronView in, a Plot out; each keeps to a point or column
budget and its note says what was reduced. plotly only; no Streamlit.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale

from ..profile.view import MAX_COLUMNS, NeuronView, Profile
from .firing import Plot, _empty, _text
from .layout import short, titled

MAX_POINTS = 400          # points per hot-neuron curve
MODEL_WIDE = "#222222"
BOOST, SUPPRESS = "#2ca02c", "#d62728"
TOKEN_CHARS = 16
HIST_MARGIN = 0.05        # histogram: air either side of the bins that hold data, as a share of their span


def _style(fig: go.Figure, title: str, x: str, y: str, sub: str = "", **layout) -> go.Figure:
    fig.update_layout(xaxis_title=x, yaxis_title=y, template="plotly_white", **titled(title, sub, left=70), **layout)
    return fig


def _setting(profile: Profile) -> str:
    s = profile.settings
    return f"oracle top-k at density {s['density']:g} · {profile.manifest.get('tokens', 0):,} tokens"


def _thin(n: int, keep: int) -> np.ndarray:
    """At most `keep` of the positions 0..n-1, evenly spread, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, keep)).round().astype(int))


def hot_curves(profile: Profile, max_points: int = MAX_POINTS) -> Plot:
    """Share of all oracle selections covered by the hottest share of neurons: one line per layer and
    the model-wide curve (every layer's neurons pooled)."""
    fig = go.Figure()
    colors = sample_colorscale("Viridis", max(2, profile.n_layers))
    curves = [(f"layer {l}", profile.hot_curve(l), dict(color=colors[l], width=1.2)) for l in range(profile.n_layers)]
    curves.append(("model-wide", profile.hot_curve(), dict(color=MODEL_WIDE, width=3)))
    thinned = False
    for name, curve, line in curves:
        keep = _thin(len(curve.units), max_points)
        thinned |= len(keep) < len(curve.units)
        fig.add_trace(go.Scatter(x=curve.units[keep], y=curve.selections[keep], mode="lines", name=name, line=line,
                                 hovertemplate=f"{name}<br>hottest %{{x:.1%}} of neurons<br>cover %{{y:.1%}} of "
                                               "selections<extra></extra>"))
    share = profile.hot_curve().covering(0.8)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="every neuron alike",
                             line=dict(color="#aaaaaa", dash="dot")))
    note = f"Each curve drawn through at most {max_points} of its points." if thinned else ""
    return Plot(_style(fig, "Hot neurons: how few carry the firing", "share of neurons, hottest first",
                       "share of all oracle selections", sub=f"{share:.1%} of neurons cover 80% · {_setting(profile)}",
                       xaxis=dict(tickformat=".0%", range=[0, 1]), yaxis=dict(tickformat=".0%", range=[0, 1.02])), note)


def firing_heatmap(profile: Profile, max_columns: int = MAX_COLUMNS) -> Plot:
    """Layers x neurons firing frequency, each layer's neurons sorted most frequent first; the colour
    scale spans the data's range (the note says so), so that a matrix of low frequencies is not all dark."""
    m = profile.firing_matrix(max_columns)
    starts = np.arange(0, m.units, m.block)
    lo, hi = float(m.values.min()), float(m.values.max())
    zmin, zmax = (lo, hi) if hi > lo else (0.0, 1.0)        # the data's range; one value: the whole scale
    fig = go.Figure(go.Heatmap(z=m.values, x=starts, y=list(range(profile.n_layers)), colorscale="Viridis",
                               zmin=zmin, zmax=zmax, colorbar=dict(title="fires on", tickformat=".1%"),
                               hovertemplate="layer %{y}<br>rank %{x}<br>fires on %{z:.1%} of tokens<extra></extra>"))
    notes = [f"Colours span this profile's range, {zmin:.1%} to {zmax:.1%} of tokens, not 0 to 100%."
             if hi > lo else "",
             f"Each column is the mean of {m.block} neighbouring ranks: {m.units:,} neurons per layer in "
             f"{m.values.shape[1]} columns." if m.block > 1 else ""]
    note = " ".join(n for n in notes if n)
    return Plot(_style(fig, "Firing frequency, neurons sorted per layer", "neuron rank within its layer, most "
                       "frequent first", "layer", sub=_setting(profile),
                       height=max(300, 160 + 18 * profile.n_layers), yaxis=dict(dtick=1, autorange="reversed")), note)


def layer_quality(profile: Profile) -> Plot:
    """Per layer: recall and precision of the profile's policy against the oracle, and mass kept. Under
    topk the policy is the oracle (recall = precision = 1 by construction): mass kept only, and a note."""
    t = profile.layer_table()
    s = profile.settings
    oracle = s["policy"] == "topk"                    # the policy is the oracle: nothing to compare
    lines = (("mass_kept", "mass kept"),) if oracle else (
        ("recall", "recall"), ("precision", "precision"), ("mass_kept", "mass kept"))
    fig = go.Figure([go.Scatter(x=t["layer"], y=t[col], mode="lines+markers", name=label) for col, label in lines])
    note = ("Recall and precision are not drawn: under topk the policy is the oracle, so both are 1 by "
            "construction." if oracle else "")
    return Plot(_style(fig, f"The {s['policy']} policy against the oracle", "layer", "share (0 to 1)",
                       sub=f"density {s['density']:g}, over {profile.manifest.get('tokens', 0):,} tokens",
                       yaxis_range=[0, 1.02], xaxis_dtick=1, showlegend=True), note)


def neuron_histogram(view: NeuronView) -> Plot:
    """The counts of h in the profile's fixed bins; the two open bins drawn as wide as an inner one. The
    x axis spans the bins that hold data (and a margin), not the fixed bins' whole range."""
    edges = np.asarray(view.hist_edges, dtype=float)
    if len(edges) == 0 or not sum(view.hist):
        return _empty(f"Layer {view.layer}, neuron {view.unit}: no activations counted.")
    width = float(np.diff(edges).mean()) if len(edges) > 1 else 1.0
    lo, hi = np.append(edges[0] - width, edges), np.append(edges, edges[-1] + width)
    labels = [f"< {edges[0]:.3g}"] + [f"[{a:.3g}, {b:.3g})" for a, b in zip(edges[:-1], edges[1:])] + [f"≥ {edges[-1]:.3g}"]
    fig = go.Figure(go.Bar(x=(lo + hi) / 2, y=view.hist, width=hi - lo, customdata=labels, marker_color="#636efa",
                           hovertemplate="h in %{customdata}<br>%{y:,} tokens<extra></extra>"))
    used = np.flatnonzero(np.asarray(view.hist))                 # the axis spans the bins that hold data
    left, right = lo[used[0]], hi[used[-1]]
    margin = HIST_MARGIN * (right - left)
    return Plot(_style(fig, f"Layer {view.layer}, neuron {view.unit}: distribution of h", "activation h",
                       "tokens", sub=f"{view.tokens:,} tokens · max |h| {view.max_abs:.3g} · mean |h| "
                       f"{view.mean_abs:.3g}", bargap=0, xaxis_range=[left - margin, right + margin]))


def logit_effects(view: NeuronView) -> Plot:
    """The tokens whose logits the neuron's output direction raises and lowers most."""
    if view.logits is None:
        return _empty("This profile has no logit effects (an encoder has no unembedding).")
    if view.logits.empty:
        return _empty(f"Layer {view.layer}, neuron {view.unit}: the profile stored no logit effects for it.")
    df = view.logits.assign(order=lambda d: np.where(d["sign"] == "boost", d["rank"], 2000 - d["rank"]))
    df = df.sort_values("order")
    labels = [f"{'+' if s == 'boost' else '−'}{r + 1} {_text(short(t, TOKEN_CHARS))}"
              for s, r, t in zip(df["sign"], df["rank"], df["token"])]
    fig = go.Figure(go.Bar(x=df["value"], y=labels, orientation="h",
                           marker_color=[BOOST if s == "boost" else SUPPRESS for s in df["sign"]],
                           hovertemplate="%{y}<br>logit effect %{x:.4g}<extra></extra>"))
    return Plot(_style(fig, f"Layer {view.layer}, neuron {view.unit}: logit effects", "effect on the logit",
                       "token", sub="green: boosted most · red: suppressed most", height=max(320, 120 + 22 * len(df)),
                       yaxis=dict(type="category", autorange="reversed")))
