"""Figures of speed: the current run's forward times and per-token MLP read floors, the kernel
benchmark (ms and speedup vs density against the bandwidth floor and the ideal 1/density, as
TEAL and Deja Vu plot kernel speedups), and decode tokens/s dense vs sparse against the Amdahl
ideal 1 / (f_other + f_mlp * density). Pure functions, bounded like sam_viz.figures.firing: rows in, Plot out.
"""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .firing import DENSE, SPARSE, Plot, _empty, _text
from .layout import titled

FLOOR, IDEAL = "#2ca02c", "#7f7f7f"
MAX_ROWS = 500            # benchmark rows drawn; each becomes a handful of values
MAX_SERIES = 8            # (shape, dtype) panels / lines kept
HEIGHT = 360


def _style(fig: go.Figure, title: str, sub: str = "", subplot_titles: bool = False, **layout) -> go.Figure:
    fig.update_layout(template="plotly_white", height=HEIGHT, legend=dict(orientation="h", y=-0.25),
                      **titled(title, sub, bottom=45, subplot_titles=subplot_titles), **layout)
    return fig


def _bounded(rows: list[dict]) -> tuple[list[dict], str]:
    if len(rows) <= MAX_ROWS:
        return rows, ""
    return rows[:MAX_ROWS], f"Showing the first {MAX_ROWS} of {len(rows):,} rows."


def forward_bars(timing: dict, summary: dict | None) -> Plot:
    """Left: the prompt's forward time, dense vs sparse (measured). Right: per token, the time to
    read the MLP weights once at the measured bandwidth, dense vs sparse (the floors)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"prompt forward, {timing['tokens']} tokens (ms)",
                                                        "MLP weight read floor per token (ms)"))
    fig.add_trace(go.Bar(x=["dense", "sparse"], y=[timing["dense_ms"], timing["sparse_ms"]],
                         marker_color=[DENSE, SPARSE], name="measured",
                         hovertemplate="%{x}: %{y:.2f} ms<extra></extra>"), row=1, col=1)
    if summary is not None:
        fig.add_trace(go.Bar(x=["dense", "sparse"], y=[summary["dense_floor_ms"], summary["sparse_floor_ms"]],
                             marker_color=[DENSE, SPARSE], opacity=0.6, name="floor",
                             hovertemplate="%{x}: %{y:.3f} ms<extra></extra>"), row=1, col=2)
    return Plot(_style(fig, "Time: measured forward and the bandwidth floor", subplot_titles=True,
                       sub="dense vs sparse; floor = the MLP weights read once", showlegend=False),
                "" if summary is not None else "This run has no cost data, so no floor is drawn.")


def _series(rows: list[dict]) -> tuple[list[tuple[str, str]], str]:
    keys = list(dict.fromkeys((r["shape"], r["dtype"]) for r in rows))
    if len(keys) <= MAX_SERIES:
        return keys, ""
    return keys[:MAX_SERIES], f"Showing {MAX_SERIES} of {len(keys)} shape / dtype combinations."


def _of(rows: list[dict], key: tuple[str, str]) -> list[dict]:
    return sorted((r for r in rows if (r["shape"], r["dtype"]) == key), key=lambda r: r["density"])


def kernel_ms(rows: list[dict]) -> Plot:
    """ms vs density per shape and dtype: dense F.linear, the cpu kernel and the read-once floor."""
    if not rows:
        return _empty("No kernel benchmark yet: run it to see kernel times against the floor.")
    rows, note = _bounded(rows)
    keys, more = _series(rows)
    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[_text(f"{s} {d}") for s, d in keys])
    for col, key in enumerate(keys, start=1):
        kr = _of(rows, key)
        x = [r["density"] for r in kr]
        for name, field, color, dash in (("dense", "dense_ms", DENSE, "dot"), ("cpu kernel", "ms", SPARSE, None),
                                         ("floor (read once)", "floor_ms", FLOOR, "dash")):
            fig.add_trace(go.Scatter(x=x, y=[r[field] for r in kr], mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1, line=dict(color=color, dash=dash),
                                     hovertemplate=f"{name}<br>density %{{x:g}}<br>%{{y:.3f}} ms<extra></extra>"),
                          row=1, col=col)
        fig.update_xaxes(title_text="density", row=1, col=col)
    fig.update_yaxes(title_text="ms per call (batch 1)", row=1, col=1, rangemode="tozero")
    return Plot(_style(fig, "Sparse MLP kernel: time per call vs density", subplot_titles=True,
                       sub="batch 1; floor = the selected rows read once"), " ".join(p for p in (note, more) if p))


def kernel_speedup(rows: list[dict]) -> Plot:
    """Speedup of the cpu kernel over dense vs density, one line per shape and dtype, and 1/density."""
    if not rows:
        return _empty("No kernel benchmark yet: run it to see the speedup against the ideal 1/density.")
    rows, note = _bounded(rows)
    keys, more = _series(rows)
    fig = go.Figure()
    for key in keys:
        kr = _of(rows, key)
        fig.add_trace(go.Scatter(x=[r["density"] for r in kr], y=[r["speedup_vs_dense"] for r in kr],
                                 mode="lines+markers", name=_text(f"{key[0]} {key[1]}"),
                                 hovertemplate="density %{x:g}<br>%{y:.2f}x<extra></extra>"))
    xs = sorted({r["density"] for r in rows})
    fig.add_trace(go.Scatter(x=xs, y=[1 / d for d in xs], mode="lines", name="ideal 1/density",
                             line=dict(color=IDEAL, dash="dash")))
    return Plot(_style(fig, "Kernel speedup over dense vs density", sub="batch 1; ideal = 1/density",
                       xaxis_title="density", yaxis_title="speedup over dense (x)", yaxis_rangemode="tozero"),
                " ".join(p for p in (note, more) if p))


def decode_tokens(rows: list[dict]) -> Plot:
    """Greedy decode tokens/s vs density: dense, sparse, and the ideal (dense x Amdahl speedup)."""
    if not rows:
        return _empty("No decode benchmark yet: run it to see tokens/s dense vs sparse.")
    rows, note = _bounded(rows)
    rows = sorted(rows, key=lambda r: r["density"])
    x = [r["density"] for r in rows]
    fig = go.Figure()
    for name, ys, color, dash in (
            ("dense", [r["dense_tok_s"] for r in rows], DENSE, "dot"),
            ("sparse (cpu kernel)", [r["sparse_tok_s"] for r in rows], SPARSE, None),
            ("ideal: dense / (f_other + f_mlp x density)", [r["dense_tok_s"] * r["ideal_speedup"] for r in rows],
             IDEAL, "dash")):
        fig.add_trace(go.Scatter(x=x, y=ys, mode="lines+markers", name=name, line=dict(color=color, dash=dash),
                                 hovertemplate=f"{name}<br>density %{{x:g}}<br>%{{y:.2f}} tokens/s<extra></extra>"))
    f_mlp = rows[0]["f_mlp"]
    return Plot(_style(fig, f"Greedy decode; MLPs {f_mlp:.0%} of a dense step", xaxis_title="density",
                       sub="batch 1; ideal = dense / (f_other + f_mlp x density)", yaxis_title="tokens / s",
                       yaxis_rangemode="tozero"), note)
