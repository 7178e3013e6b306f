"""A click on the Firing map's heatmap opens that neuron in the Corpus page's neuron view (issue 14).

AppTest cannot click a plotly chart, so the pieces are checked apart: the selection event Streamlit
sends for a clicked cell (its point's x and y, as plotly reports them) maps back to the cell's token
and neuron, also on a heatmap reduced to fit the cell budget, checked against the activations the
analysis recorded; and the page, given the clicked cell in its session state as the on_select
callback leaves it, links to the neuron view of that layer and neuron. In a real Chromium, a click
on a cell links the cell that the hover label names.
"""
import re
from pathlib import Path
from urllib.parse import urlencode

import pytest
from streamlit.testing.v1 import AppTest

from conftest import shared
from sam_viz import RunSpec, analyze
from sam_viz.figures import firing as P
from test_app import run_db  # noqa: F401 - autouse: a fresh run store per test
from test_browser import CHROMIUM, _open, browser, profile_dir, server  # noqa: F401 - fixtures
from test_profile_view import PID, write_profile

ROOT = Path(__file__).resolve().parent.parent
PROMPT = " ".join(["The keeper counted ships in the storm."] * 6)


@pytest.fixture(scope="module")
def run():
    return analyze(shared("tiny-llama"), RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.3))


def event(x, y) -> dict:
    """A points selection as Streamlit reports one click on a marker (curve, point, x, y)."""
    return {"points": [{"curve_number": 1, "point_number": 0, "point_index": 0, "x": x, "y": y}],
            "point_indices": [0], "box": [], "lasso": []}


@pytest.mark.parametrize("max_cells", [P.MAX_CELLS, 2_000])
def test_every_cell_maps_back_to_its_token_and_neuron(run, max_cells):
    layer = 1
    plot = P.firing_heatmap(run, layer, "frequency", max_cells=max_cells, clickable=True)
    heat, clicks = plot.fig.data[0], plot.fig.data[1:]
    acts = run.layers[layer].activations.float()
    reduced = len(heat.x) < run.n_neurons and len(heat.y) < len(run.tokens)
    assert reduced == (max_cells < P.MAX_CELLS)           # the small budget drops neurons and tokens
    seen = set()
    for click in clicks:
        for x, y, h in zip(click.x, click.y, click.customdata):
            for shown_x in (x, str(x)):                    # a category axis may report the id as text
                token, neuron = P.clicked_cell(event(shown_x, y))
                assert run.tokens[token] == y.split(": ", 1)[1]
                assert float(acts[token, neuron]) == pytest.approx(float(h), abs=1e-6)
            seen.add((token, neuron))
    rows = {int(label.split(":")[0]) for label in heat.y}
    assert seen == {(t, n) for t in rows for n in heat.x}   # every shown cell, and only those


def test_nothing_usable_picked_maps_to_none():
    assert P.clicked_cell(None) is None
    assert P.clicked_cell({"points": [], "point_indices": [], "box": [], "lasso": []}) is None
    assert P.clicked_cell({"points": [{"x": "neuron", "y": "3: a"}]}) is None
    assert P.clicked_cell({"points": [{"curve_number": 0}]}) is None


def open_firing(layer: str, cell: dict | None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "pages" / "firing.py"), default_timeout=180)
    at.query_params["model"], at.query_params["prompt"], at.query_params["layer"] = "tiny-llama", PROMPT, layer
    if cell is not None:                    # as _remember_click leaves it for a click on this run's map
        at.session_state["firing_cell"] = {"model": "tiny-llama", "prompt": PROMPT, **cell}
    return at.run()


def corpus_links(at) -> list[str]:
    return [m.value for m in at.markdown if "over a corpus" in m.value]


def test_clicked_cell_links_to_its_neuron_over_a_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_PROFILE_DIR", str(tmp_path / "profiles"))
    write_profile(tmp_path / "profiles", model="tiny-llama")
    at = open_firing("1", dict(layer=1, token=4, neuron=37))
    assert not at.exception and not at.error
    link = [v for v in corpus_links(at) if v.startswith("[Neuron 37 over a corpus")]
    assert link and f"corpus?profile={PID}&layer=1&neuron=37)" in link[0] and "token 4" in link[0]
    other = open_firing("0", dict(layer=1, token=4, neuron=37))    # a click on another layer's map
    assert not other.exception and not [v for v in corpus_links(other) if v.startswith("[Neuron 37")]
    stale = open_firing("1", dict(layer=1, token=4, neuron=37, prompt="Another prompt."))   # another run's map
    assert not stale.exception and not [v for v in corpus_links(stale) if v.startswith("[Neuron 37")]


def test_clicked_cell_without_a_profile_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_PROFILE_DIR", str(tmp_path / "none"))
    at = open_firing("1", dict(layer=1, token=4, neuron=37))
    assert not at.exception and not at.error and not corpus_links(at)
    assert any("Neuron 37 has no corpus view yet" in c.value for c in at.caption)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found; browser test skipped")
def test_a_click_in_the_browser_links_the_hovered_cell(server, browser, tmp_path_factory):
    """Real Chromium: the cell under the pointer (its hover label names token and neuron) is the one
    the link opens, on a heatmap that a real plotly click selected."""
    if not (profile_dir(tmp_path_factory) / PID).exists():
        write_profile(profile_dir(tmp_path_factory), model="tiny-llama")
    query = urlencode({"model": "tiny-llama", "prompt": "One two three four five six.", "policy": "topk",
                       "density": "0.5", "layer": "1"})
    page = _open(browser, f"{server}/?{query}")
    page.wait_for_selector(".js-plotly-plot .gtitle:has-text('which neurons the sparse model computed')",
                           timeout=120_000)
    box = page.locator(".js-plotly-plot").first.locator(".nsewdrag").first.bounding_box()
    x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4
    page.mouse.move(x, y)
    page.wait_for_selector(".hoverlayer .hovertext", timeout=10_000)
    label = page.locator(".hoverlayer .hovertext").first.text_content()
    token, neuron = re.search(r"token (\d+):.*neuron (\d+)", label).groups()
    page.mouse.click(x, y)
    link = page.locator("a", has_text="the cell you clicked")
    link.wait_for(timeout=120_000)
    assert f"Neuron {neuron} over a corpus" in link.inner_text() and f"token {token})" in link.inner_text()
    assert link.get_attribute("href").endswith(f"corpus?profile={PID}&layer=1&neuron={neuron}")
    page.close()
