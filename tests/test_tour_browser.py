"""The tour and the claim page in a real browser (Chromium, as tests/test_browser.py starts it): the
token marks are drawn in the page's own font, not a fallback one, and the claims table's FLOPs column
is on screen at 1400 px."""
import pytest

from test_browser import CHROMIUM, _open, _wait_for_titles, browser, server  # noqa: F401 - fixtures

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found; browser test skipped")


def fonts(page, selector: str) -> list[dict]:
    """The platform fonts Chromium drew the text right inside the first element matching `selector` with."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument", {"depth": -1, "pierce": True})["root"]["nodeId"]
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
    return cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]


def test_token_marks_are_drawn_in_the_texts_own_font(server, browser):  # noqa: F811
    page = _open(browser, f"{server}/tour?step=1")
    _wait_for_titles(page, ["every neuron computed"], timeout=180_000)
    page.locator("p", has_text="in a token marks a space").first.wait_for(timeout=60_000)
    page.evaluate("""() => { for (const p of document.querySelectorAll('p'))
                               if (p.textContent.includes('in a token marks a space')) p.id = 'marks'; }""")
    used = fonts(page, "#marks")
    assert len({f["familyName"] for f in used}) == 1, used              # no glyph from a fallback font
    page.evaluate("""() => { for (const t of document.querySelectorAll('.ytick text'))
                               if (t.textContent.includes('\u00b7')) { t.id = 'tick'; break; } }""")
    used = fonts(page, "#tick")
    assert len({f["familyName"] for f in used}) == 1, used
    page.close()


def test_claims_flops_column_is_on_screen_at_1400_px(server, browser):  # noqa: F811
    page = _open(browser, f"{server}/claims")
    header = page.get_by_role("columnheader", name="MLP FLOPs vs dense")
    header.wait_for(state="attached", timeout=120_000)
    grid = page.locator("[data-testid='stDataFrame']").first.bounding_box()
    left = page.evaluate("""() => { const h = [...document.querySelectorAll('[role=columnheader]')];
                                     return h.map(e => e.textContent); }""")
    assert left, left
    box = header.bounding_box()
    assert box is not None and box["x"] + box["width"] <= min(1400, grid["x"] + grid["width"]), (box, grid)
    page.close()
