"""Figures for the pages: pure functions, an Analysis (or plain rows) in, a `Plot` out.

The views follow the papers the app studies: per-token neuron firing maps as in Deja Vu's
contextual-sparsity plots, the magnitude distribution of h and mass kept vs density behind
TEAL's and CATS' thresholds, and quality-vs-sparsity curves. Every figure keeps to a cell
budget (`max_cells` array values across all its traces: past it, heatmaps keep the most active
neurons, then every n-th token) and its `note` says in one sentence what it left out. Titles,
subtitles and margins come from sam_viz.figures.layout (they fit a half-width column).
plotly.graph_objects only; no Streamlit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import torch

from .layout import short, titled

MAX_CELLS = 200_000
STYLE_CELLS = 32        # array values a figure may spend on styling (colorscale stops), not data
MIN_NEURONS = 16        # a reduced firing heatmap keeps at least this many neurons before it drops tokens
ORDERS = ("index", "frequency", "clustered")
DENSE, SPARSE, DROPPED = "#1f77b4", "#ff7f0e", "#9e9e9e"
DROPPED_SCALE = ("#4a6f96", "#e8e8e8")       # firing heatmap, dropped cells: large |h| .. small |h|
COMPUTED_SCALE = ("#fdbb84", "#8b0000")      # computed cells: small |h| .. large |h|
METRIC_LABELS = {"kl": "KL(dense || sparse)", "cosine": "embedding cosine vs dense"}
OUTLIER = 10            # token detail: bars past OUTLIER x the median |dense h| shown are cut at the axis
TOKEN_CHARS = 12        # a token's text in a title, at most
HEAT_HOVER = ("token %{y}<br>neuron %{x}<br>h = %{customdata:.4g}<br>"
              "%{z:+.3g} on the colour scale (+ computed, - dropped)<extra></extra>")
HEAT_HOVER_DENSE = "token %{y}<br>neuron %{x}<br>h = %{customdata:.4g}<extra></extra>"   # nothing dropped
NO_ACTIVATIONS = ("This run kept no per-neuron activations (the prompt is too long for the activation "
                  "budget), so this figure cannot be drawn; try a shorter prompt.")


@dataclass(frozen=True)
class Plot:
    fig: go.Figure
    note: str = ""       # "" or one sentence on what was left out


# ---------------------------------------------------------------------------------------- helpers

def _empty(note: str) -> Plot:
    fig = go.Figure()
    fig.update_layout(template="plotly_white", height=220, xaxis_visible=False, yaxis_visible=False,
                      annotations=[dict(text=note, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)])
    return Plot(fig, note)


def _style(fig: go.Figure, title: str, x: str, y: str, sub: str = "", subplot_titles: bool = False,
           **layout) -> go.Figure:
    fig.update_layout(xaxis_title=x, yaxis_title=y, template="plotly_white",
                      **titled(title, sub, left=70, subplot_titles=subplot_titles), **layout)
    return fig


def _index(i: int, n: int, what: str) -> int:
    if not 0 <= int(i) < n:
        raise ValueError(f"{what} {i} is out of range: this run has {n} {what}s (0 to {n - 1})")
    return int(i)


def _run_label(analysis) -> str:
    return f"{analysis.spec.policy} at density {target_density(analysis):g}"


def target_density(analysis) -> float:
    """The density the run asked for (1 for the dense policy)."""
    return 1.0 if analysis.spec.policy == "dense" else analysis.spec.density


def _text(s: str) -> str:
    """Text from the prompt or the vocabulary, escaped: plotly reads labels as a subset of HTML."""
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _token_labels(tokens: list[str], rows: list[int]) -> list[str]:
    return [f"{t}: {_text(tokens[t])}" for t in rows]


def _fit(n_rows: int, n_cols: int, per_cell: int, max_cells: int, min_cols: int) -> tuple[int, int]:
    """Largest (rows, cols) within (n_rows, n_cols) with per_cell*r*c + r + c + STYLE_CELLS <= max_cells:
    columns are cut first, down to min_cols, then rows."""
    room = max_cells - STYLE_CELLS
    cols = n_cols
    if per_cell * n_rows * cols + n_rows + cols > room:
        cols = min(n_cols, max(min_cols, (room - n_rows) // (per_cell * n_rows + 1)))
    rows = min(n_rows, (room - cols) // (per_cell * cols + 1))
    if rows < 1:
        cols, rows = (room - 1) // (per_cell + 1), 1
    if cols < 1:
        raise ValueError(f"max_cells={max_cells:,} is too small to draw this figure")
    return rows, cols


def _strided(n: int, keep: int) -> tuple[torch.Tensor, int]:
    """Every step-th of n positions, so that at most `keep` remain; (positions, step)."""
    step = math.ceil(n / keep)
    return torch.arange(0, n, step), step


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _every(step: int, n: int, word: str) -> str:
    return "" if step == 1 else f"every {_ordinal(step)} of {n:,} {word}"


def _reduced(parts: list[str], max_cells: int) -> str:
    parts = [p for p in parts if p]
    return f"Showing {' and '.join(parts)} (cell budget {max_cells:,})." if parts else ""


def _selected(lf, n_neurons: int) -> torch.Tensor:
    """[T, n_neurons] bool: the neurons the pass computed per token, from the CSR trace."""
    n_tok = lf.selected.shape[0]
    if lf.ids is None:
        return torch.ones(n_tok, n_neurons, dtype=torch.bool)
    mask = torch.zeros(n_tok, n_neurons, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(n_tok), (lf.indptr[1:] - lf.indptr[:-1]).long())
    mask[rows, lf.ids.long()] = True
    return mask


def _routed(analysis, lf) -> torch.Tensor | None:
    """[T, n_neurons] bool: neurons of the experts the router picked per token, and of the shared
    experts (every token), or None unless the layer routes."""
    if not analysis.n_experts or lf.experts is None:
        return None
    n_tok = lf.experts.shape[0]
    picked = torch.zeros(n_tok, analysis.n_experts, dtype=torch.bool)
    picked[torch.arange(n_tok)[:, None], lf.experts.long()] = True
    shared = torch.ones(n_tok, analysis.n_shared, dtype=torch.bool)
    return torch.cat([picked.repeat_interleave(analysis.d_ff, dim=1), shared], dim=1)


def _token_grid(analysis, z: torch.Tensor, col_word: str, max_cells: int, **heatmap) -> tuple[go.Heatmap, str]:
    """Heatmap trace of z [T, C] (tokens x a few columns); every n-th token past the cell budget."""
    n_tok, n_col = z.shape
    rows, cols = _fit(n_tok, n_col, 1, max_cells, n_col)
    t_idx, t_step = _strided(n_tok, rows)
    c_idx, c_step = _strided(n_col, cols)
    note = _reduced([_every(c_step, n_col, col_word), _every(t_step, n_tok, "tokens")], max_cells)
    trace = go.Heatmap(z=z[t_idx][:, c_idx].numpy(), x=c_idx.tolist(),
                       y=_token_labels(analysis.tokens, t_idx.tolist()), **heatmap)
    return trace, note


def _grid_layout(n_rows: int) -> dict:
    return dict(height=min(900, 220 + 14 * n_rows), xaxis_type="category",
                yaxis=dict(type="category", autorange="reversed"))


# ---------------------------------------------------------------------------------- firing heatmap

def firing_heatmap(analysis, layer: int, order: str = "index", max_cells: int = MAX_CELLS,
                   clickable: bool = False) -> Plot:
    """Tokens x neurons of |h| in the sparse pass: +|h| (warm) where the sparse model computed the
    neuron, -|h| (grey-blue) where it dropped it, blank for MoE experts not routed. Past the budget:
    the neurons of largest total |h|, then every n-th token. The heatmap carries its own hover (h as
    typed-array customdata); `clickable` adds a WebGL layer of invisible markers, one per cell, that
    a click selects (plotly selects no heatmap cell): in SVG that layer took Chromium 3.4-3.9 s to
    draw at 64 x 780 cells, against 0.3-0.5 s for the heatmap alone, so it is drawn only where a click
    leads somewhere (the page: when the model has a corpus profile)."""
    if order not in ORDERS:
        raise ValueError(f"unknown order '{order}'; choose one of {', '.join(ORDERS)}")
    lf = analysis.layers[_index(layer, analysis.n_layers, "layer")]
    if lf.activations is None:
        return _empty(NO_ACTIVATIONS)
    h = lf.activations.float()                                           # [T, N]
    n_tok, n_neu = h.shape
    sel = _selected(lf, n_neu)
    rows, cols = _fit(n_tok, n_neu, 4 if clickable else 2, max_cells, MIN_NEURONS)   # z and h, or z; x, y, h
    keep = _neuron_order(h, sel, order, cols)                            # [cols] neuron ids
    t_idx, t_step = _strided(n_tok, rows)
    shown_h, shown_sel = h[t_idx][:, keep], sel[t_idx][:, keep]          # [rows, cols]
    z = torch.where(shown_sel, shown_h.abs(), -shown_h.abs())
    status = np.where(shown_sel.numpy(), "computed", "dropped").astype(object)
    routed = _routed(analysis, lf)
    if routed is not None:                                               # MoE: experts the router skipped
        skipped = ~routed[t_idx][:, keep]
        z[skipped] = float("nan")
        status[skipped.numpy()] = "expert not routed"
    labels = _token_labels(analysis.tokens, t_idx.tolist())
    dense = bool(sel.all())                                              # a dense run: nothing was dropped
    hover = dict(hoverinfo="skip") if clickable else dict(customdata=shown_h.numpy(),
                                                          hovertemplate=HEAT_HOVER_DENSE if dense else HEAT_HOVER)
    fig = go.Figure(go.Heatmap(z=z.numpy(), x=keep.tolist(), y=labels, **hover, **_firing_colors(z)))
    if clickable:
        fig.add_traces(_click_layer(labels, keep.tolist(), shown_h.numpy(), status))
    by = {"index": "neuron index", "frequency": "tokens that selected it, most first",
          "clustered": "similar firing patterns side by side"}[order]
    ids = f" = expert × {analysis.d_ff} + index" if analysis.n_experts else ""
    if dense:
        title, key = f"Layer {layer}: each neuron's |h|, every neuron computed", "redder = larger |h|"
    else:
        title, key = f"Layer {layer}: which neurons the sparse model computed", "warm = computed, blue-grey = dropped"
    _style(fig, title, f"neuron{ids} (ordered by {by})", "token", sub=f"{_run_label(analysis)} · {key}",
           **_grid_layout(len(t_idx)))
    fig.update_layout(hoverdistance=-1)                                  # any point of a cell picks it
    note = _reduced([f"the {cols:,} most active of {n_neu:,} neurons" if cols < n_neu else "",
                     _every(t_step, n_tok, "tokens")], max_cells)
    return Plot(fig, note)


def _click_layer(labels: list[str], neurons: list[int], h: np.ndarray, status: np.ndarray) -> list[go.Scatter]:
    """Invisible WebGL markers at the cell centres, one trace per status: plotly reports no click or
    selection on a heatmap, so these carry the hover text and the cell a click selects (x = neuron id, y = the
    token's label, customdata = h), which `clicked_cell` reads back."""
    traces = []
    for name in ("computed", "dropped", "expert not routed"):
        rows, cols = np.nonzero(status == name)
        if len(rows):
            traces.append(go.Scattergl(
                x=[neurons[c] for c in cols], y=[labels[r] for r in rows], customdata=h[rows, cols],
                mode="markers", marker=dict(opacity=0, size=10, symbol="square-open", color="black"),
                selected=dict(marker=dict(opacity=1)), name=name, showlegend=False,
                hovertemplate=f"token %{{y}}<br>neuron %{{x}}<br>h = %{{customdata:.4g}}<br>{name}<extra></extra>"))
    return traces


def clicked_cell(selection) -> tuple[int, int] | None:
    """(token, neuron) of the firing heatmap cell a Streamlit selection event picked (its first point),
    read from the point's x (the neuron id) and y (the label "token: text"); None when nothing usable
    was picked. The ids are the cell's own, so a heatmap reduced to fit the budget maps back exactly."""
    points = (selection or {}).get("points") or []
    for point in points:
        try:
            token = int(str(point["y"]).split(":", 1)[0])
            neuron = int(float(point["x"]))
        except (KeyError, TypeError, ValueError):
            continue
        if token >= 0 and neuron >= 0:
            return token, neuron
    return None


def _firing_colors(z: torch.Tensor) -> dict:
    """A colour scale that steps at 0: dropped cells (z < 0) grey-blue, computed cells (z > 0) orange to
    red, each side scaled to its own 99th percentile of |h| so that small computed values read as computed;
    with no dropped cell (a dense run), the computed side alone."""
    def top(x):
        return max(float(torch.quantile(x, 0.99)) if x.numel() else 0.0, 1e-6)
    hi = top(z[z > 0])
    if not bool((z < 0).any()):                                          # nothing dropped: the warm side only
        ticks = dict(tickvals=[0, hi], ticktext=["0", f"{hi:.2g}"])
        return dict(colorscale=[[0.0, COMPUTED_SCALE[0]], [1.0, COMPUTED_SCALE[1]]], zmin=0, zmax=hi,
                    colorbar=dict(title="|h|", **ticks))
    lo = top(-z[z < 0])
    p = lo / (lo + hi)
    scale = [[0.0, DROPPED_SCALE[0]], [p, DROPPED_SCALE[1]], [p, COMPUTED_SCALE[0]], [1.0, COMPUTED_SCALE[1]]]
    ticks = dict(tickvals=[-lo, 0, hi], ticktext=[f"{lo:.2g} dropped", "0", f"{hi:.2g} computed"])
    return dict(colorscale=scale, zmin=-lo, zmax=hi, colorbar=dict(title="|h|", **ticks))


def _neuron_order(h: torch.Tensor, sel: torch.Tensor, order: str, n_keep: int) -> torch.Tensor:
    """Ids of the n_keep neurons of largest total |h|, in the order asked for."""
    mass = h.abs().sum(0)                                                # [N]
    if n_keep >= mass.numel():
        keep = torch.arange(mass.numel())
    else:
        keep = torch.topk(mass, n_keep).indices.sort().values
    if order == "frequency":
        keep = keep[torch.sort(-sel[:, keep].sum(0), stable=True).indices]   # ties: lower index first
    elif order == "clustered":
        keep = keep[_seriate(h[:, keep].abs())]
    return keep


def _seriate(x: torch.Tensor) -> torch.Tensor:
    """Order of the columns of x [T, c] along the leading eigenvector of their centred cosine
    similarity (the first principal axis of the unit-norm columns): a cheap seriation."""
    if x.shape[1] < 3:
        return torch.arange(x.shape[1])
    unit = x / x.norm(dim=0).clamp(min=1e-12)                            # [T, c]
    centred = unit - unit.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)   # vh [min(T, c), c]
    return torch.sort(vh[0], stable=True).indices


# ---------------------------------------------------------------------------------- one token

def token_neurons(analysis, layer: int, token: int, top: int = 20) -> Plot:
    """One token's `top` neurons by dense |h|: dense h next to the h the sparse model used
    (0 where it dropped the neuron; those are grey, hatched and labelled "(dropped)")."""
    layer = _index(layer, analysis.n_layers, "layer")
    token = _index(token, len(analysis.tokens), "token")
    dense_lf, sparse_lf = analysis.dense_layers[layer], analysis.layers[layer]
    if dense_lf.activations is None:
        return _empty(NO_ACTIVATIONS)
    hd = dense_lf.activations[token].float()                             # [N]
    ids = torch.topk(hd.abs(), min(max(1, top), hd.numel())).indices
    hs, computed = _sparse_row(analysis, sparse_lf, token, hd.numel())
    comp = computed[ids].tolist()
    labels = [_neuron_name(analysis, j) + ("" if c else " (dropped)") for j, c in zip(ids.tolist(), comp)]
    fig = go.Figure([
        go.Bar(name="dense h", y=labels, x=hd[ids].tolist(), customdata=ids.tolist(), orientation="h",
               marker=dict(color=[DENSE if c else DROPPED for c in comp],
                           pattern_shape=["" if c else "/" for c in comp]),
               hovertemplate="%{y}<br>dense h = %{x:.4g}<extra></extra>"),
        go.Bar(name="sparse h (0 if dropped)", y=labels, x=hs[ids].tolist(), orientation="h",
               marker_color=SPARSE, hovertemplate="%{y}<br>sparse h = %{x:.4g}<extra></extra>"),
    ])
    title = f"Layer {layer}, token {token} '{_text(short(analysis.tokens[token], TOKEN_CHARS))}'"
    sub = f"top {len(ids)} neurons by dense |h| · grey hatched = dropped"
    cut, note = _cut_axis(labels, hd[ids], hs[ids])
    return Plot(_style(fig, title, "activation h", "neuron", sub=sub, barmode="group",
                       height=max(350, 130 + 28 * len(ids)), yaxis=dict(type="category", autorange="reversed"),
                       **cut), note)


def _cut_axis(labels: list[str], dense: torch.Tensor, sparse: torch.Tensor) -> tuple[dict, str]:
    """Layout keywords that cut the x axis when a few bars reach past OUTLIER x the median |dense h|
    (one outlier would flatten every other bar), each cut bar's value written at the edge; and a note."""
    both = torch.stack([dense, sparse])                                  # [2, n]
    cap = OUTLIER * float(dense.abs().median())
    if cap <= 0 or float(both.abs().max()) <= cap:
        return {}, ""
    limit = 1.1 * float(both.abs()[both.abs() <= cap].max())
    lo, hi = max(-limit, 1.1 * min(0.0, float(both.min()))), min(limit, 1.1 * max(0.0, float(both.max())))
    marks = []
    for i, label in enumerate(labels):
        for sign, x, anchor in ((1, hi, "right"), (-1, lo, "left")):
            values = " / ".join(dict.fromkeys(f"{v:.3g}" for v in both[:, i].tolist() if sign * v > limit))
            if values:
                marks.append(dict(x=x, y=label, xanchor=anchor, showarrow=False, font=dict(size=11),
                                  bgcolor="rgba(255,255,255,0.85)",
                                  text=f"{values} →" if sign > 0 else f"← {values}"))
    n = len({m["y"] for m in marks})
    note = (f"The axis is cut at {limit:.3g} so that outliers do not flatten the other bars; the values of the "
            f"{n} cut neuron{'s' if n > 1 else ''} are written at the edge.")
    return dict(xaxis_range=[lo, hi], annotations=marks), note


def _sparse_row(analysis, lf, token: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h the sparse pass used [n], 0 where not computed; computed [n] bool) for one token."""
    computed = _selected(lf, n)[token]
    routed = _routed(analysis, lf)
    if routed is not None:
        computed &= routed[token]
    row = lf.token(token)
    if row is None:
        hs = lf.activations[token].float() if lf.activations is not None else torch.zeros(n)
        return hs * computed, computed
    hs = torch.zeros(n)
    hs[row[0].long()] = row[1].float()
    return hs, computed


def _neuron_name(analysis, j: int) -> str:
    if analysis.n_experts and j >= analysis.n_experts * analysis.d_ff:
        return f"shared experts · neuron {j - analysis.n_experts * analysis.d_ff}"
    if analysis.n_experts:
        return f"expert {j // analysis.d_ff} · neuron {j % analysis.d_ff}"
    return f"neuron {j}"


# ---------------------------------------------------------------------------------- density

def density_tokens_layers(analysis, max_cells: int = MAX_CELLS) -> Plot:
    """Tokens x layers: the share of its neurons each token computed in each layer, coloured over this
    run's range (topk's cells are all equal: the subtitle says so)."""
    dens = torch.stack([lf.selected.float() / lf.possible.float().clamp(min=1) for lf in analysis.layers], 1)
    lo, hi = float(dens.min()), float(dens.max())
    if hi - lo < 1e-6:
        zrange, span = (max(0.0, lo - 0.05), min(1.0, hi + 0.05)), f"every cell is {lo:.3g}"
    else:
        zrange, span = (lo, hi), f"colours span {lo:.3g} to {hi:.3g}, this run's range"
    trace, note = _token_grid(analysis, dens, "layers", max_cells, colorscale="Viridis", zmin=zrange[0],
                              zmax=zrange[1], colorbar=dict(title="MLP<br>neuron<br>density"),
                              hovertemplate="token %{y}<br>layer %{x}<br>density %{z:.3f}<extra></extra>")
    fig = _style(go.Figure(trace), "Share of neurons computed per token and layer", "layer", "token",
                 sub=f"target {target_density(analysis):g} · {span}", **_grid_layout(len(trace.y)))
    return Plot(fig, note)


# ---------------------------------------------------------------------------------- MoE routing

def expert_heatmap(analysis, layer: int, max_cells: int = MAX_CELLS) -> Plot:
    """MoE: tokens x experts of the router's weight (0 where the expert was not picked); the shared
    experts, which every token goes through, are one last column "shared" at 1."""
    if not analysis.n_experts:
        return _empty("This model has no experts: expert routing exists only in mixture-of-experts models.")
    lf = analysis.layers[_index(layer, analysis.n_layers, "layer")]
    if lf.experts is None:
        return _empty(f"Layer {layer} is a dense MLP of this mixture-of-experts model: every token goes through "
                      "all of its neurons, and no router chooses.")
    weights = torch.zeros(lf.experts.shape[0], analysis.n_experts + (analysis.n_shared > 0))   # [T, E (+1)]
    weights.scatter_(1, lf.experts.long(), lf.expert_weights.float())
    weights[:, analysis.n_experts:] = 1.0
    trace, note = _token_grid(analysis, weights, "experts", max_cells, colorscale="Oranges", zmin=0,
                              zmax=max(1.0, float(weights.max())), colorbar=dict(title="weight"),
                              hovertemplate="token %{y}<br>expert %{x}<br>weight %{z:.3f}<extra></extra>")
    if analysis.n_shared:
        trace.x = ["shared" if x == analysis.n_experts else x for x in trace.x]
    sub = "colour = the router's weight; blank = not picked" + (
        "; shared: the shared experts, every token" if analysis.n_shared else "")
    fig = _style(go.Figure(trace), f"Layer {layer}: experts the router picked per token", "expert", "token",
                 sub=sub, **_grid_layout(len(trace.y)))
    return Plot(fig, note)
