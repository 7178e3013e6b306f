"""Exports of an Analysis: JSON (everything but the dense activations), CSV (long format, one row
per layer and token, as tidy-data tools expect) and one standalone, offline HTML report with plotly
figures (plotly.js inlined once, as plotly's own `to_html(include_plotlyjs=True)` does).
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
from dataclasses import asdict

from sam_viz.sparse_ops import INPUT_CALIBRATED

from .analysis import Analysis

EXPORT_FORMAT, EXPORT_VERSION = "sam-viz-export", 1
CSV_COLUMNS = ("layer", "token_index", "token", "selected", "possible", "density", "mass_kept_share", "scope",
               "allocation")   # density: of the MLP's neurons; scope, allocation: the run's (allocation: teal, wina)


def firing_ids(layer) -> list[list[int]] | None:
    """[token][k] neuron ids the sparse pass computed; None when every neuron fired (dense)."""
    if layer.ids is None:
        return None
    ids, ptr = layer.ids.tolist(), layer.indptr.tolist()
    return [ids[a:b] for a, b in zip(ptr, ptr[1:])]


def to_json(a: Analysis) -> str:
    """One JSON document. `firing[layer][token]` lists neuron ids (MoE: expert * d_ff + j), null for
    a layer where every neuron fired; `routing[layer][token]` lists the router's experts (MoE)."""
    div = a.layer_divergence
    doc = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION, "spec": asdict(a.spec), "kind": a.kind,
        "model_type": a.model_type, "tokens": a.tokens, "d_ff": a.d_ff, "n_experts": a.n_experts,
        "density": a.density, "model_density": a.model_density,
        "layers": [{"layer": i, "density": l.density, "mass_kept": l.mass_kept_share,
                    "divergence": div[i] if i < len(div) else None,
                    "projections": a.projections[i] if a.projections else None} for i, l in enumerate(a.layers)],
        "compare": a.compare, "next_tokens": a.next_tokens, "sentence_cosines": a.sentence_cosines,
        "continuation": a.continuation, "sweep": a.sweep, "timings_ms": a.timings_ms,
        "firing": [firing_ids(l) for l in a.layers],
        "routing": [None if l.experts is None else l.experts.tolist() for l in a.layers],
    }
    return json.dumps(_finite(doc), allow_nan=False, ensure_ascii=False)


def _finite(x):
    """NaN and infinities become None (JSON has no such numbers)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def to_csv(a: Analysis) -> str:
    """Long format: one row per (layer, token) of the sparse pass, with a header row; every row names the
    run's scope and (teal, wina) allocation."""
    out = io.StringIO()
    scope, allocation = a.spec.scope, allocation_of(a.spec)
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for i, l in enumerate(a.layers):
        cols = zip(l.selected.tolist(), l.possible.tolist(), l.mass_kept.tolist(), l.mass_total.tolist())
        for t, (sel, pos, kept, total) in enumerate(cols):
            share = kept / total if total > 0 else 1.0
            w.writerow((i, t, csv_text(a.tokens[t]), sel, pos, sel / pos if pos else 1.0, share, scope, allocation))
    return out.getvalue()


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_text(text: str) -> str:
    """A text cell that a spreadsheet shows as text: one starting like a formula (=, +, -, @, tab,
    CR; OWASP's CSV injection advice) gets a leading apostrophe. Only text cells: numbers stay numbers."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>sam-viz: {title}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}}td,th{{border:1px solid #ccc;padding:.25em .6em;
text-align:left}}pre{{white-space:pre-wrap;background:#f6f6f6;padding:.6em}}.note{{color:#555}}</style>
</head><body>
{body}
</body></html>
"""


def to_html(a: Analysis, figures) -> str:
    """One standalone HTML file that works offline. figures: (title, figure) pairs or bare figures,
    where a figure is a plotly Figure or a sam_viz.figures.firing.Plot (its `.note` is shown under it)."""
    s = a.spec
    body = [f"<h1>sam-viz run: {_e(s.model)}</h1>",
            _table(("model", "scope", "policy", "allocation", "density", "kernel", "tokens",
                    "MLP density achieved", "whole-model density (embeddings excluded)"),
                   [(s.model, s.scope, s.policy, allocation_of(s), _num(s.density), s.kernel, len(a.tokens),
                     _num(a.density), _num(a.model_density) if a.model_density is not None else "n/a")]),
            f"<h2>Prompt</h2><pre>{_e(s.prompt)}</pre>",
            "<h2>Dense vs sparse</h2>", _table(("metric", "value"), [(k, _num(v)) for k, v in a.compare.items()]),
            "<h2>Per layer</h2>",
            _table(("layer", "density", "mass kept", "divergence"),
                   [(i, _num(l.density), _num(l.mass_kept_share),
                     _num(a.layer_divergence[i]) if i < len(a.layer_divergence) else "")
                    for i, l in enumerate(a.layers)])]
    for n, item in enumerate(figures):
        title, fig, note = _unpack(item)
        body.append(f"<h2>{_e(title)}</h2>" if title else "")
        body.append(fig.to_html(full_html=False, include_plotlyjs=n == 0, default_height="480px",
                                config={"displaylogo": False}))
        body.append(f'<p class="note">{_e(note)}</p>' if note else "")
    return PAGE.format(title=_e(f"{s.model}, {s.policy} at {s.density:g}"), body="\n".join(body))


def allocation_of(spec) -> str:
    """The run's allocation where it means something (teal, wina), else ""."""
    return spec.allocation if spec.policy in INPUT_CALIBRATED else ""


def _unpack(item):
    title, fig = item if isinstance(item, tuple) else (getattr(item, "title", ""), item)
    if hasattr(fig, "fig"):                                   # a Plot: figure plus its note
        return title, fig.fig, getattr(fig, "note", "")
    return title, fig, ""


def _table(head, rows) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _num(x) -> str:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return f"{x:.4g}" if math.isfinite(x) else "n/a"
    return str(x)


def _e(x) -> str:
    return html.escape(str(x if x is not None else ""))
