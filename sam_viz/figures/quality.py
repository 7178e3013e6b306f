"""Figures of quality and distribution for the pages: density per layer, the distribution of |h|,
mass kept vs density, the density sweep, divergence per layer and the next-token lists (TEAL's and
CATS' magnitude views, quality-vs-sparsity curves). Pure functions, an Analysis (or plain rows) in,
a `sam_viz.figures.firing.Plot` out; the firing views and shared helpers live in sam_viz.figures.firing.
"""
from __future__ import annotations

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .firing import (DENSE, DROPPED, METRIC_LABELS, NO_ACTIVATIONS, SPARSE, Plot, _empty, _routed, _run_label,
                    _style, _text, target_density)
from .layout import percent_axis


def density_per_layer(analysis) -> Plot:
    """Per layer: achieved density and mass kept (bars) against the target density (line)."""
    x = list(range(analysis.n_layers))
    fig = go.Figure([
        go.Bar(name="MLP neuron density achieved", x=x, y=[lf.density for lf in analysis.layers], marker_color=SPARSE,
               hovertemplate="layer %{x}<br>MLP neuron density %{y:.3f}<extra></extra>"),
        go.Bar(name="mass kept (share of Σ|h|)", x=x, y=[lf.mass_kept_share for lf in analysis.layers],
               marker_color=DENSE, hovertemplate="layer %{x}<br>mass kept %{y:.3f}<extra></extra>"),
        go.Scatter(name=f"target density {target_density(analysis):g}", x=x, y=[target_density(analysis)] * len(x),
                   mode="lines+markers", line=dict(color="black", dash="dash")),
    ])
    return Plot(_style(fig, "Density and mass kept per layer", "layer", "share of the MLP (embeddings not counted)", sub=_run_label(analysis),
                       barmode="group", yaxis_range=[0, 1.05], xaxis_dtick=1))


def activation_histogram(analysis, dense: bool = True, bins: int = 60) -> Plot:
    """Distribution of |h| per layer on log-spaced bins, one line per layer (counted here, not in the
    browser: bins x layers points)."""
    layers = analysis.dense_layers if dense else analysis.layers
    if any(lf.activations is None for lf in layers):
        return _empty(NO_ACTIVATIONS)
    logs, zero_share = _log_abs(analysis, layers)
    if not any(x.numel() for x in logs):
        return _empty("Every activation in this run is exactly 0, so there is no distribution to draw.")
    lo = min(float(x.min()) for x in logs if x.numel())
    hi = max(max(float(x.max()) for x in logs if x.numel()), lo + 1e-6)
    edges = torch.linspace(lo, hi, max(1, bins) + 1)
    centres = (10 ** ((edges[:-1] + edges[1:]) / 2)).tolist()
    fig = go.Figure([go.Scatter(x=centres, y=(torch.histc(x, len(centres), lo, hi) / max(1, x.numel())).tolist(),
                                mode="lines", name=f"layer {i}",
                                hovertemplate="|h| ≈ %{x:.3g}<br>%{y:.2%} of values")
                     for i, x in enumerate(logs)])
    _style(fig, "How large |h| is, per layer", "|h| (log scale)", "share of the layer's values",
           sub=f"{'dense' if dense else 'sparse'} pass, {len(centres)} log-spaced bins", xaxis_type="log",
           yaxis_tickformat=".0%")
    zeros = f"{zero_share:.1%} of the values are exactly 0 and are left out of the log-scale histogram."
    return Plot(fig, zeros if zero_share else "")


def _log_abs(analysis, layers) -> tuple[list[torch.Tensor], float]:
    """log10 |h| of the nonzero values of each layer (MoE: only experts that ran), and the share of 0s."""
    logs, zeros, total = [], 0, 0
    for lf in layers:
        a = lf.activations.float().abs()                                 # [T, N]
        routed = _routed(analysis, lf)
        a = a[routed] if routed is not None else a.flatten()
        total, zeros = total + a.numel(), zeros + int((a == 0).sum())
        logs.append(torch.log10(a[a > 0]))
    return logs, zeros / max(1, total)


def mass_curve_plot(curve: list[list[float]], densities) -> Plot:
    """Mass kept vs density, one line per layer; the diagonal is what evenly spread |h| would give."""
    if not curve:
        return _empty("No mass curve to draw: it needs the captured activations of a run.")
    x = [float(d) for d in densities]
    fig = go.Figure([go.Scatter(x=x, y=list(row), mode="lines+markers", name=f"layer {i}")
                     for i, row in enumerate(curve)])
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="evenly spread (y = x)",
                             line=dict(color="grey", dash="dot"), hoverinfo="skip"))
    return Plot(_style(fig, "Share of Σ|h| kept vs density", "density (share of neurons kept per token)",
                       "share of Σ|h| kept", sub="if each token kept only its top neurons, per layer",
                       xaxis_range=[0, 1.02], yaxis_range=[0, 1.02]))


# ---------------------------------------------------------------------------------- quality

def sweep_plot(rows: list[dict], current: float | None = None) -> Plot:
    """Output quality vs target density, one line per policy (rows of explore.density_sweep), and a
    dotted line at the `current` density (the run on screen), if given."""
    if not rows:
        return _empty("No sweep yet: run the density sweep to see quality vs density.")
    metric = rows[0]["metric"]
    fig = go.Figure()
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pr = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["density"])
        fig.add_trace(go.Scatter(
            x=[r["density"] for r in pr], y=[r["value"] for r in pr], mode="lines+markers", name=policy,
            customdata=[r["achieved_density"] for r in pr],
            hovertemplate="target density %{x:g}<br>achieved %{customdata:.3f}<br>value %{y:.4g}"))
    if current is not None:
        fig.add_vline(x=current, line=dict(color="black", dash="dot", width=1),
                      annotation_text=f"this run: {current:g}", annotation_position="top left")
    sub = ("lower" if metric == "kl" else "higher") + " is better"
    sub += "; dotted line: this run's density" if current is not None else ""
    return Plot(_style(fig, "Output quality vs density", "target MLP neuron density (embeddings not counted)", METRIC_LABELS.get(metric, metric), sub=sub))


def divergence_plot(analysis) -> Plot:
    """Relative error of the hidden state after each layer, sparse vs dense."""
    x = list(range(analysis.n_layers))
    fig = go.Figure(go.Bar(x=x, y=list(analysis.layer_divergence), marker_color=SPARSE,
                           hovertemplate="layer %{x}<br>relative error %{y:.3~%}<extra></extra>"))
    return Plot(_style(fig, "Hidden state drift, sparse vs dense", "layer",
                       "‖h_sparse − h_dense‖ / ‖h_dense‖", sub="relative error after each layer",
                       yaxis=percent_axis(analysis.layer_divergence), xaxis_dtick=1))


def next_token_plot(analysis, labels: tuple[str, str] = ("dense model", "sparse model"),
                    x_max: float | None = None) -> Plot:
    """Causal LMs: dense vs sparse top-10 next tokens, the panels titled `labels` (what differs between
    the two passes) and, with `x_max`, both on the probability axis 0..x_max (else each fits its own);
    encoders: embedding cosine per sentence."""
    if analysis.next_tokens:
        return Plot(_next_tokens(analysis.next_tokens, labels, x_max))
    if analysis.sentence_cosines:
        return Plot(_sentence_cosines(analysis.sentence_cosines))
    return _empty("This run recorded no output comparison to draw.")


def _next_tokens(nt: dict[str, list[dict]], labels: tuple[str, str], x_max: float | None) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=tuple(_text(t) for t in labels), horizontal_spacing=0.25)
    for col, (name, other, color) in ((1, ("dense", "sparse", DENSE)), (2, ("sparse", "dense", SPARSE))):
        theirs = {it["token"] for it in nt[other]}
        ranked = [f"{i + 1}. {_text(it['token'])}" for i, it in enumerate(nt[name])]
        fig.add_trace(go.Bar(x=[it["prob"] for it in nt[name]], y=ranked, orientation="h", name=name,
                             marker_color=[color if it["token"] in theirs else DROPPED for it in nt[name]],
                             hovertemplate="%{y}: %{x:.4g}"), row=1, col=col)
        fig.update_yaxes(type="category", autorange="reversed", row=1, col=col)
        fig.update_xaxes(title_text="probability", row=1, col=col, **({} if x_max is None else {"range": [0, x_max]}))
    return _style(fig, "Next token at the last position: top 10", "probability", "",
                  sub="grey = not in the other model's top 10", subplot_titles=True, showlegend=False, height=420)


def _sentence_cosines(rows: list[dict]) -> go.Figure:
    short = [r["sentence"] if len(r["sentence"]) <= 40 else r["sentence"][:39] + "…" for r in rows]
    fig = go.Figure(go.Bar(x=[f"{i + 1}. {_text(s)}" for i, s in enumerate(short)], y=[r["cosine"] for r in rows],
                           customdata=[_text(r["sentence"]) for r in rows], marker_color=SPARSE,
                           hovertemplate="%{customdata}<br>cosine %{y:.4f}<extra></extra>"))
    return _style(fig, "Sentence embeddings, sparse vs dense", "sentence", "embedding cosine vs dense",
                  sub="cosine per sentence (1 = identical)", xaxis_tickangle=-30, xaxis_type="category",
                  yaxis_range=[min(0.0, *(r["cosine"] for r in rows)), 1.0])
