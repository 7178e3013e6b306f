"""The tour in a real browser (Chromium, as tests/test_browser.py starts it): the token marks are
drawn in the page's own fonts, not a fallback one. (The claims table is a canvas grid whose headers
have no box in the DOM; its column order is checked in tests/test_claims.py.)"""
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
    assert used and all(f["isCustomFont"] for f in used), used         # the app's web fonts, no system fallback
    page.evaluate("""() => { for (const t of document.querySelectorAll('.ytick text'))
                               if (t.textContent.includes('\u00b7')) { t.id = 'tick'; break; }
                             document.querySelector('.xtick text').id = 'plain'; }""")
    family = lambda selector: {f["familyName"] for f in fonts(page, selector)}  # noqa: E731
    assert family("#tick") == family("#plain"), (family("#tick"), family("#plain"))   # as an ASCII label
    page.close()

