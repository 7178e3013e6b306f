"""Exports: JSON parses and matches the trace, CSV has one row per (layer, token), the HTML report is
one offline file with plotly.js inlined once and the user's text escaped."""
import csv
from html import escape as html_escape
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import plotly.graph_objects as go
import pytest

from conftest import shared
from sam_viz import RunSpec, analyze, density_sweep, greedy_continuation
from sam_viz.export import to_csv, to_html, to_json

ROOT = Path(__file__).resolve().parent.parent
XSS = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def llama():
    m = shared("tiny-llama")
    a = analyze(m, RunSpec(prompt=f"The cat sat on the mat. {XSS} & more", model="tiny-llama",
                           policy="threshold", density=0.3))
    a.sweep = density_sweep(m, a.spec, densities=(0.1, 0.5))
    a.continuation = greedy_continuation(m, a.spec, 4)
    return a


@pytest.fixture(scope="module")
def mixtral():
    return analyze(shared("tiny-mixtral"), RunSpec(prompt="Routing is coarse sparsity.", model="tiny-mixtral",
                                                   policy="topk", density=0.25))


def figures():
    return [("Bars", go.Figure(go.Bar(x=["a", "b"], y=[1, 2]))),
            SimpleNamespace(title="Heat", fig=go.Figure(go.Heatmap(z=[[1, 2], [3, 4]])), note=f"note {XSS}"),
            ("Line", go.Figure(go.Scatter(y=[3, 1, 2]), layout={"title": XSS}))]


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_json_parses_and_matches_the_trace(name, request):
    a = request.getfixturevalue(name)
    doc = json.loads(to_json(a), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc["tokens"] == a.tokens and doc["spec"]["model"] == a.spec.model and doc["kind"] == a.kind
    assert len(doc["layers"]) == len(doc["firing"]) == a.n_layers
    for i, (row, firing, layer) in enumerate(zip(doc["layers"], doc["firing"], a.layers)):
        assert row["layer"] == i
        assert row["density"] == pytest.approx(float(layer.selected.sum()) / float(layer.possible.sum()))
        assert row["divergence"] == pytest.approx(a.layer_divergence[i])
        assert [len(ids) for ids in firing] == layer.selected.tolist()
        for t in range(len(a.tokens)):
            assert firing[t] == layer.token(t)[0].tolist() and all(type(j) is int for j in firing[t])
    assert doc["compare"] == a.compare and doc["timings_ms"] == a.timings_ms
    if name == "llama":
        assert doc["sweep"] == a.sweep and doc["continuation"] == a.continuation and doc["next_tokens"]
        assert doc["routing"] == [None] * a.n_layers
    else:
        assert doc["routing"][0] == a.layers[0].experts.tolist()


def test_json_maps_non_finite_to_null_and_dense_layers_to_null(llama):
    a = analyze(shared("tiny-llama"), RunSpec(prompt="Dense run.", model="tiny-llama", policy="dense"))
    a.compare = {"kl": float("nan"), "max_abs_diff": float("inf")}
    a.layer_divergence[0] = float("-inf")
    doc = json.loads(to_json(a))
    assert doc["compare"] == {"kl": None, "max_abs_diff": None} and doc["layers"][0]["divergence"] is None
    assert doc["firing"] == [None] * a.n_layers and doc["density"] == 1.0


def test_csv_long_format(llama):
    rows = list(csv.DictReader(io.StringIO(to_csv(llama))))
    assert len(rows) == llama.n_layers * len(llama.tokens)
    assert list(rows[0]) == ["layer", "token_index", "token", "selected", "possible", "density",
                             "mass_kept_share", "scope", "allocation"]
    assert {(r["scope"], r["allocation"]) for r in rows} == {("mlp", "")}
    for r in rows:
        layer, t = llama.layers[int(r["layer"])], int(r["token_index"])
        assert r["token"] == llama.tokens[t]
        assert int(r["selected"]) == int(layer.selected[t]) == len(layer.token(t)[0])
        assert int(r["possible"]) == int(layer.possible[t])
        assert float(r["density"]) == pytest.approx(int(layer.selected[t]) / int(layer.possible[t]))
        share = float(layer.mass_kept[t]) / float(layer.mass_total[t])
        assert float(r["mass_kept_share"]) == pytest.approx(share) and 0.0 <= share <= 1.0 + 1e-6


def test_html_is_standalone_and_escaped(llama):
    figs = figures()
    page = to_html(llama, figs)
    assert page.startswith("<!DOCTYPE html>") and page.count("<html") == 1
    assert page.count("* plotly.js v") == 1                           # the library's banner: inlined once
    assert page.count("Plotly.newPlot(") == len(figs)
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)         # no external script of any kind
    start = page.index("* plotly.js v")
    library = page[start:page.index("</script>", start)]
    outside = page.replace(library, "")
    assert "cdn." not in outside and "http://" not in outside and "https://" not in outside
    assert XSS not in page and html_escaped(XSS) in page
    assert f"note {html_escaped(XSS)}" in page
    for text in ("tiny-llama", "threshold", llama.spec.kernel, "kl", "top1_agreement", "mass kept", "Heat", "Line"):
        assert text in outside
    assert "</table>" in outside and outside.count("<tr>") >= 1 + llama.n_layers


def test_html_without_figures(llama):
    page = to_html(llama, [])
    assert "plotly.js" not in page and "tiny-llama" in page and XSS not in page


def test_html_shows_markdown_signs_in_the_prompt_literally():
    from test_text import PROMPT, parse_html

    prompt = PROMPT + "\n# not a heading\n$$x$$"
    a = analyze(shared("tiny-llama"), RunSpec(prompt=prompt, model="tiny-llama", policy="topk", density=0.5))
    page = to_html(a, [])
    pre = page[page.index("<pre>"):page.index("</pre>") + len("</pre>")]
    assert "".join(parse_html(pre).text) == prompt and "<b>" not in pre


def html_escaped(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_store_and_export_import_without_streamlit():
    code = "import sys, sam_viz.store, sam_viz.export; print('streamlit' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "False", done.stderr


def test_html_report_of_the_app_figures(tmp_path):
    """The runs page's HTML export: sam_viz.report's (title, Plot) list, notes shown, JS inlined once."""
    from sam_viz.report import report_plots

    m = shared("tiny-mixtral")
    a = analyze(m, RunSpec(prompt="Experts route tokens. Some fire often.", model="tiny-mixtral",
                           policy="threshold", density=0.3))
    plots = report_plots(a, layer=1)
    html = to_html(a, plots)
    assert html.count("Plotly.newPlot(") == len(plots)
    assert "<script src=" not in html
    for title, plot in plots:
        assert title in html
        if plot.note:
            assert html_escape(plot.note) in html
