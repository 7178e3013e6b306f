"""A real browser 1400 px wide with the sidebar open: every chart's title and subtitle lie inside the
chart (not cut at its right edge), below the modebar, and above the plot area."""
from urllib.parse import urlencode

import pytest

from test_browser import CHROMIUM, _open, browser, server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found; browser test skipped")]

GEOMETRY = """el => {
    const r = el.getBoundingClientRect();
    const box = s => { const n = el.querySelector(s); if (!n) return null; const b = n.getBoundingClientRect();
                       return {l: b.left - r.left, t: b.top - r.top, r: b.right - r.left, b: b.bottom - r.top}; };
    return {width: r.width, title: box('.gtitle'), sub: box('.gtitle-subtitle'), modebar: box('.modebar'),
            plot: box('.nsewdrag'), text: (el.querySelector('.gtitle') || {}).textContent};
}"""


@pytest.mark.parametrize("page,params", [
    ("routing", dict(model="tiny-mixtral", density="0.25")),
    ("", dict(model="minilm", layer="2")),
])
def test_titles_are_whole_and_clear_of_the_modebar(server, browser, page, params):   # noqa: F811
    query = urlencode({"prompt": "The cat sat on the mat. It was warm.", **params})
    tab = _open(browser, f"{server}/{page}?{query}")
    tab.wait_for_selector(".js-plotly-plot .gtitle", timeout=180_000)
    tab.wait_for_timeout(3000)
    charts = tab.locator(".js-plotly-plot")
    assert charts.count() >= 3
    for i in range(charts.count()):
        charts.nth(i).hover()                                   # the modebar shows on hover only
        tab.wait_for_timeout(300)
        g = charts.nth(i).evaluate(GEOMETRY)
        title, sub, bar = g["title"], g["sub"], g["modebar"]
        assert title and bar, g
        for text in (title, sub):
            if text:
                assert 0 <= text["l"] and text["r"] <= g["width"], g            # not cut at the edge
        assert title["t"] >= bar["b"] - 1, g                                   # below the modebar
        assert (sub or title)["b"] <= g["plot"]["t"] + 1, g                    # above the plot area
    tab.close()


def test_whole_model_page_draws_the_kept_map(server, browser):   # noqa: F811
    """A link straight to the Whole model page under scope all: the kept map is drawn, no exception."""
    query = urlencode({"model": "tiny-llama", "scope": "all", "policy": "topk", "density": "0.5"})
    tab = _open(browser, f"{server}/whole_model?{query}")
    tab.wait_for_selector(".js-plotly-plot .gtitle", timeout=180_000)
    tab.wait_for_timeout(3000)
    titles = [t.text_content() for t in tab.locator(".js-plotly-plot .gtitle").all()]
    assert any("which input channels each token kept" in t for t in titles), titles
    assert tab.locator(".js-plotly-plot .heatmaplayer").count() >= 1
    assert tab.locator("[data-testid='stException']").count() == 0
    tab.close()
