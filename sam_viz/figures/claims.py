"""The claim's figure: held-out perplexity vs MLP density of demo-lm and its dense twin under topk
(the quality-vs-sparsity curve of Deja Vu, CATS and TEAL), the other policies at the trained
density as points, the dense twin's perplexity and the issue's bar (within 15% of it). A pure
function of parsed claims (sam_viz.claims.parse_claims, at most MAX_ROWS rows): no Streamlit.
"""
from __future__ import annotations

import math

import plotly.graph_objects as go

from ..claims import BAR_RATIO, DENSE, SPARSE, find
from .firing import DENSE as DENSE_COLOUR, SPARSE as SPARSE_COLOUR, Plot, _empty
from .layout import titled

COLOURS = {SPARSE: SPARSE_COLOUR, DENSE: DENSE_COLOUR}
SYMBOLS = {"threshold": "diamond", "predictor": "star", "static": "x"}
BAR_COLOUR = "#2ca02c"
HOVER = "density %{x:g}<br>perplexity %{y:.3f}<extra></extra>"


def topk_curve(claims: dict, model: str) -> list[tuple[float, float]]:
    """(density, perplexity) of the model under topk, with every neuron at density 1."""
    points = {r["density"]: r["perplexity"] for r in claims["rows"] if r["model"] == model and r["policy"] == "topk"}
    full = find(claims, model, "dense")
    if full is not None:
        points[1.0] = full["perplexity"]
    return sorted(points.items())


def log_ticks(low: float, high: float) -> list[float]:
    """1-2-3-5 ticks for a log axis over [low, high], with the decade step below when fewer than three
    fit (28 to 31: 28, 29, 30, 31), each labelled with its whole value: plotly's own log ticks label
    only the decades ("100") and write 30 and 50 as "3" and "5"."""
    for steps in ((1, 2, 3, 5), (1, 1.5, 2, 3, 5, 7)):
        decades = range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
        ticks = [m * 10 ** e for e in decades for m in steps if low <= m * 10 ** e <= high]
        if len(ticks) >= 3:
            return ticks
    step = 10 ** math.floor(math.log10(max(high - low, 1e-9)))
    return [step * i for i in range(math.ceil(low / step), math.floor(high / step) + 1)]


def _label(v: float) -> str:
    return f"{v:,.0f}" if v >= 10 else f"{v:g}"


def perplexity_curve(claims: dict) -> Plot:
    """Perplexity (log axis) vs density (log axis) per model; lower is better."""
    if not claims["rows"]:
        return _empty("The claims file has no rows to draw.")
    fig = go.Figure()
    for model in (SPARSE, DENSE):
        pts = topk_curve(claims, model)
        if pts:
            fig.add_trace(go.Scatter(x=[d for d, _ in pts], y=[p for _, p in pts], mode="lines+markers",
                                     name=f"{model}, topk", line=dict(color=COLOURS[model]),
                                     hovertemplate=f"{model} topk<br>{HOVER}"))
        for policy, symbol in SYMBOLS.items():
            rows = [r for r in claims["rows"] if r["model"] == model and r["policy"] == policy]
            if rows:
                fig.add_trace(go.Scatter(
                    x=[r["density"] for r in rows], y=[r["perplexity"] for r in rows], mode="markers",
                    name=f"{model}, {policy}", marker=dict(color=COLOURS[model], symbol=symbol, size=10),
                    hovertemplate=f"{model} {policy}<br>{HOVER}"))
    base = find(claims, DENSE, "dense")
    densities = sorted({r["density"] for r in claims["rows"]} | {1.0})
    if base is not None:                       # lines as traces: annotations on a log axis misplace
        for y, name, dash in ((base["perplexity"], "dense twin", "dot"),
                              (base["perplexity"] * BAR_RATIO, f"bar: dense twin +{BAR_RATIO - 1:.0%}", "dash")):
            fig.add_trace(go.Scatter(x=[densities[0], densities[-1]], y=[y, y], mode="lines", name=name,
                                     line=dict(color=BAR_COLOUR, dash=dash, width=1),
                                     hovertemplate=f"{name}: %{{y:.3f}}<extra></extra>"))
    ys = [y for t in fig.data for y in t.y]
    yticks = log_ticks(min(ys), max(ys))
    fig.update_layout(template="plotly_white", height=440, legend=dict(orientation="h", y=-0.25),
                      xaxis=dict(title="MLP density (share of neurons computed per token)", type="log",
                                 tickmode="array", tickvals=densities, ticktext=[f"{d:g}" for d in densities]),
                      yaxis=dict(title="held-out perplexity", type="log", tickmode="array", tickvals=yticks,
                                 ticktext=[_label(v) for v in yticks]),
                      **titled("Held-out perplexity vs MLP density", "demo-lm and its dense twin; lower is better",
                               bottom=60))
    return Plot(fig)
