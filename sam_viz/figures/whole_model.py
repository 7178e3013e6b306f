"""Figures of the whole-model scope (issue 22, section 5): the kept map (tokens x input channels of one
projection, as the firing map shows neurons), the allocation of a block's density over its projections
(TEAL's greedy beside uniform, with the block output error), how often each policy keeps the massive
activation channels, the mass each projection keeps, and quality against whole-model density.
Pure functions of the data sam_viz.whole_model computes; each keeps to the cell budget. No Streamlit.
"""
from __future__ import annotations

import math

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .firing import (MAX_CELLS, MIN_NEURONS, METRIC_LABELS, Plot, _empty, _every, _firing_colors, _fit, _reduced,
                     _strided, _style, _token_labels)

WHOLE_MODEL = "whole-model density (share of the blocks' matrix weights read per token; embeddings excluded)"
INPUT_DENSITY = "input density (share of the projection's input entries read per token)"
POLICY_COLOURS = {"topk": "#636efa", "teal": "#ef553b", "wina": "#00cc96", "measured": "#636efa"}
SERIES_STYLE = {"topk": ("#636efa", "solid"), "teal uniform": ("#ef553b", "dot"), "teal greedy": ("#ef553b", "solid"),
                "wina greedy": ("#00cc96", "solid"), "MLP only: topk": ("#636efa", "dash"),
                "MLP only: threshold": ("#ab63fa", "dash")}
KEPT_HOVER = ("token %{y}<br>channel %{x}<br>x = %{customdata:.4g}<br>"
              "%{z:+.3g} on the colour scale (+ kept, - dropped)<extra></extra>")


def kept_map(x: torch.Tensor, mask: torch.Tensor, tokens: list[str], layer: int, name: str, run: str,
             max_cells: int = MAX_CELLS) -> Plot:
    """Tokens x input channels of projection `name`: +|x| (warm) where the run kept the entry, -|x|
    (blue-grey) where it dropped it, on the firing map's colour scale. Past the budget: the channels of
    largest total |x| (so the massive ones stay), in index order, then every n-th token."""
    n_tok, d_in = x.shape
    rows, cols = _fit(n_tok, d_in, 2, max_cells, MIN_NEURONS)                  # z and x as customdata
    keep = torch.sort(torch.topk(x.abs().sum(0), cols).indices).values if cols < d_in else torch.arange(d_in)
    t_idx, t_step = _strided(n_tok, rows)
    shown, kept = x[t_idx][:, keep], mask[t_idx][:, keep]                      # [rows, cols]
    z = torch.where(kept, shown.abs(), -shown.abs())
    colours = _firing_colors(z)
    colours["colorbar"]["title"] = "|x|"
    if "tickvals" in colours["colorbar"] and len(colours["colorbar"]["tickvals"]) == 3:
        colours["colorbar"]["ticktext"] = [t.replace("computed", "kept") for t in colours["colorbar"]["ticktext"]]
    fig = go.Figure(go.Heatmap(z=z.numpy(), x=keep.tolist(), y=_token_labels(tokens, t_idx.tolist()),
                               customdata=shown.numpy(), hovertemplate=KEPT_HOVER, **colours))
    share = float(mask.float().mean())
    _style(fig, f"Layer {layer}, {name}: which input channels each token kept",
           "input channel", "token", sub=f"{run} · warm = kept, blue-grey = dropped · {share:.0%} of entries kept",
           height=min(900, 220 + 14 * len(t_idx)), xaxis_type="category",
           yaxis=dict(type="category", autorange="reversed"))
    note = _reduced([f"the {cols:,} channels of largest total |x| of {d_in:,}" if cols < d_in else "",
                     _every(t_step, n_tok, "tokens")], max_cells)
    return Plot(fig, note)


def allocation_heatmap(grids: dict, target: float, kind: str) -> Plot:
    """Layers x projections of input density, one panel per allocation (uniform beside greedy, or the
    run's measured densities), and where the calibration has them, each layer's block output error."""
    panels, errors, names = grids["density"], grids.get("error"), grids["projections"]
    if not panels or not names:
        return _empty("This run recorded no projection densities.")
    n_cols = len(panels) + (1 if errors else 0)
    titles = [f"{label}" for label in panels] + (["block output error"] if errors else [])
    fig = make_subplots(rows=1, cols=n_cols, subplot_titles=titles, horizontal_spacing=0.08, shared_yaxes=True)
    n_layers = len(next(iter(panels.values())))
    layers = list(range(n_layers))
    for c, (label, grid) in enumerate(panels.items(), start=1):
        fig.add_trace(go.Heatmap(z=grid, x=names, y=layers, zmin=0, zmax=1, colorscale="Viridis",
                                 showscale=c == 1, colorbar=dict(title="input<br>density"),
                                 hovertemplate=f"{label}<br>layer %{{y}}<br>%{{x}}: %{{z:.2f}}<extra></extra>"),
                      row=1, col=c)
    if errors:
        for label, err in errors.items():
            fig.add_trace(go.Scatter(x=err, y=layers, mode="lines+markers", name=label,
                                     line=dict(color="#ef553b" if label == "uniform" else "#222222"),
                                     hovertemplate=f"{label}<br>layer %{{y}}: %{{x:.3g}}<extra></extra>"),
                          row=1, col=n_cols)
        fig.update_xaxes(title_text="relative squared error", row=1, col=n_cols)
    fig.update_yaxes(title_text="layer", autorange="reversed", dtick=max(1, math.ceil(n_layers / 24)), row=1, col=1)
    what = f"{kind}, block target {target:g}" if errors else f"{kind}: each projection's measured input density"
    _style(fig, "How the density is spread over layers and projections", "", "",
           sub=f"{what} · {INPUT_DENSITY}", subplot_titles=True, height=min(900, 260 + 18 * n_layers),
           legend=dict(orientation="h", y=-0.15))
    return Plot(fig, "")


def massive_plot(channels: list[dict], rates: dict[str, list[float]], ratio: float, layer: int, name: str) -> Plot:
    """For the channels of largest peak / median peak, the share of tokens each policy keeps them."""
    if not channels:
        return _empty("No input to find massive activations in.")
    labels = [f"{c['channel']} ({c['ratio']:.0f}x){' *' if c['massive'] else ''}" for c in channels]
    fig = go.Figure([go.Bar(x=labels, y=r, name=policy, marker_color=POLICY_COLOURS.get(policy),
                            hovertemplate=f"{policy}<br>channel %{{x}}<br>kept for %{{y:.0%}} of tokens<extra></extra>")
                     for policy, r in rates.items()])
    n = sum(c["massive"] for c in channels)
    found = (f"{n} massive (*: peak >= {ratio:g}x the median channel's)" if n else
             f"none reaches {ratio:g}x the median channel's peak")
    _style(fig, f"Layer {layer}, {name}: the largest input channels, and how often each policy keeps them",
           "channel (peak |x| / median channel peak)", "share of tokens kept", sub=found, barmode="group",
           yaxis=dict(range=[0, 1.05], tickformat=".0%"))
    return Plot(fig, "")


def mass_kept_plot(rows: list[dict], layer: int, policy: str) -> Plot:
    """Per projection of the layer, the share of its input's mass kept beside its input density."""
    if not rows:
        return _empty("This run recorded no projection inputs for this layer.")
    names = [r["projection"] for r in rows]
    what = "|x_i| x ||W[:, i]||" if policy == "wina" else "|x_i|"
    fig = go.Figure([go.Bar(x=names, y=[r["mass_kept"] for r in rows], name=f"share of sum {what} kept",
                            marker_color="#ef553b"),
                     go.Bar(x=names, y=[r["density"] for r in rows], name="share of input entries kept",
                            marker_color="#9e9e9e")])
    _style(fig, f"Layer {layer}: mass kept per projection", "projection", "share", barmode="group",
           sub=f"{policy} · the kept entries carry more than their count where the input is uneven",
           yaxis=dict(range=[0, 1.05], tickformat=".0%"), legend=dict(orientation="h", y=-0.2))
    return Plot(fig, "")


def quality_sweep(rows: list[dict], current: tuple[float, float] | None = None) -> Plot:
    """Quality (KL or cosine) against whole-model density, one line per series; the MLP-only policies at
    the whole-model work they do (attention dense: they never go below the attention's share)."""
    if not rows:
        return _empty("No sweep yet.")
    metric = rows[0]["metric"]
    fig = go.Figure()
    for label in dict.fromkeys(r["series"] for r in rows):
        pts = sorted((r["model_density"], r["value"]) for r in rows if r["series"] == label)
        colour, dash = SERIES_STYLE.get(label, ("#7f7f7f", "solid"))
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=label,
                                 line=dict(color=colour, dash=dash),
                                 hovertemplate=f"{label}<br>whole-model density %{{x:.3f}}<br>"
                                               f"{metric} %{{y:.4g}}<extra></extra>"))
    if current is not None:
        fig.add_trace(go.Scatter(x=[current[0]], y=[current[1]], mode="markers", name="this run",
                                 marker=dict(symbol="star", size=14, color="#222222")))
    _style(fig, "Output quality vs whole-model density", WHOLE_MODEL, METRIC_LABELS[metric],
           sub="dashed: MLP-only policies, attention dense", legend=dict(orientation="h", y=-0.25),
           xaxis=dict(range=[0, 1.02]), **({"yaxis_type": "log"} if metric == "kl" and _positive(rows) else {}))
    return Plot(fig, "")


def _positive(rows: list[dict]) -> bool:
    return all(r["value"] > 0 for r in rows)
