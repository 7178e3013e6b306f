"""Issue 21, links and navigation, in a real browser: a link's settings survive every menu entry (the
URL and the widgets), the Corpus page's "Open in firing map" opens the context with the profile's
settings, and a paste longer than the prompt box takes is cut to it with a warning."""
import re
import time
from urllib.parse import parse_qs, urlencode, urlparse

import pytest

from test_browser import CHROMIUM, _open, browser, profile_dir, server  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found; browser test skipped")]

SIDEBAR = dict(model="tiny-llama", prompt="The old lighthouse keeper counted ships.", policy="threshold",
               density="0.1", kernel="reference")
PAGE = dict(layer="1", token="3", order="frequency")          # the firing map's selections
MENU = ["Firing map", "Classroom tour", "Density", "Dense vs sparse", "Routing", "Whole model", "Attribution", "Speed",
        "Demo LM: the claim", "Corpus", "Runs and sharing"]
NO_SIDEBAR = {"Demo LM: the claim"}                          # draws no sidebar (its own fixed runs)
OWN_VIEWS = {"Classroom tour", "Demo LM: the claim", "Corpus"}  # not views of the sidebar's analysis
LAYER_PAGES = {"Firing map", "Routing", "Attribution"}


def url_params(page) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlparse(page.url).query).items()}


def sidebar_values(page) -> dict[str, str]:
    """What the sidebar's widgets show."""
    side = page.locator("[data-testid='stSidebar']")

    def box(label):
        return side.locator("[data-testid='stSelectbox']", has_text=label).first.locator("input").input_value()
    return dict(model=box("Model"), prompt=side.locator("textarea").first.input_value(), policy=box("Policy"),
                density=side.locator("[data-testid='stSlider'] input[type='range']").input_value(),
                kernel=box("Kernel"))


def settles(read, want, seconds: float = 30) -> bool:
    """Whether what `read` returns becomes `want` within `seconds` (a page's last rerun can land after
    its header is drawn: the view is judged once it settles, not mid-render)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if read() == want:
                return True
        except Exception:  # noqa: BLE001 - a widget being redrawn
            pass
        time.sleep(0.25)
    return False


def quiet(page, seconds: float = 90, still: float = 1.0) -> None:
    """Wait until the app has finished its script runs: no running indicator and no stale (greyed,
    about to be replaced) element for `still` seconds. Read mid-run, a page shows the last run's
    elements beside the new run's (two "frequency" radios) or the widgets before a rerun lands."""
    running = "[data-testid^='stStatusWidgetRunning'], [data-stale='true']"
    end, calm_since = time.monotonic() + seconds, None
    while time.monotonic() < end:
        if page.locator(running).count() == 0:
            calm_since = calm_since or time.monotonic()
            if time.monotonic() - calm_since >= still:
                return
        else:
            calm_since = None
        time.sleep(0.2)
    pytest.fail(f"the app was still running after {seconds:.0f} s at {page.url}")


def main_value(page, label) -> str:
    """The value a widget of the page (not the sidebar) shows: a number box's number, a select box's option."""
    return page.locator(f"[data-testid='stMain'] input[aria-label='{label}']").first.input_value()


def wait_for_url(page, params: dict):
    checks = " && ".join(f"p.get({k!r}) === {v!r}" for k, v in params.items())
    try:
        page.wait_for_function(f"(() => {{ const p = new URLSearchParams(location.search); return {checks}; }})()",
                               timeout=60_000)
    except Exception:  # noqa: BLE001 - said below with the URL there was
        pytest.fail(f"the URL {page.url} lacks some of {params}")


def test_a_link_survives_every_menu_entry(server, browser):  # noqa: F811
    """Open a link with every setting off its default, then click each menu entry in turn: every page
    with the sidebar has the link's settings in its URL and its widgets; the pages of the analysis
    also keep the firing map's layer, token and neuron order in the URL, and the widgets of those they
    show. (Before the fix the first click showed minilm, the Fox prompt and density 0.5.)"""
    page = _open(browser, f"{server}/?{urlencode({**SIDEBAR, **PAGE})}")
    for name in MENU:
        if name != "Firing map" or page.url.split("?")[0].rstrip("/") != server:
            page.locator("[data-testid='stSidebarNav'] a", has_text=name).click()
        page.wait_for_selector(f"h2:has-text('{name.split(':')[0]}')", timeout=180_000)
        quiet(page)
        if name in NO_SIDEBAR:
            continue
        wait_for_url(page, SIDEBAR)
        if name not in OWN_VIEWS:
            wait_for_url(page, {k: v for k, v in PAGE.items() if k != "token"})
            assert re.fullmatch(r"3(: .*)?", url_params(page).get("token", "")), (name, page.url)
        assert settles(lambda: sidebar_values(page), SIDEBAR), (name, sidebar_values(page))
        if name in LAYER_PAGES:
            assert settles(lambda: main_value(page, "Layer"), PAGE["layer"]), (name, main_value(page, "Layer"))
        if name == "Firing map":
            assert main_value(page, "Token").startswith("3: ")
            assert page.locator("[data-testid='stMain']").get_by_role("radio", name="frequency").is_checked()
        assert page.locator("[data-testid='stException']").count() == 0, name
    page.close()


def test_open_in_firing_map_opens_the_context_with_the_profiles_settings(server, browser, tmp_path_factory):  # noqa: F811
    """A profile of tiny-llama (threshold at 0.25) with a top context in layer 1: its "Open in firing
    map" opens that text, layer 1, the firing token (3, " $"), the model, policy and density; before the
    fix only the layer came along (the Fox prompt, density 0.5, token 0)."""
    import pandas as pd

    from test_profile_view import TRICKY, write_profile

    pid, root = "fedcba987654", profile_dir(tmp_path_factory)
    if not (root / pid).exists():
        write_profile(root, pid, created="2020-01-01T00:00:00+00:00")
        rows = [dict(layer=1, neuron=0, band="top", rank=0, value=3.0, doc=0, pos=3, tokens=TRICKY, focus=3)]
        pd.DataFrame(rows).astype({"rank": "int32", "focus": "int32"}).to_parquet(root / pid / "examples.parquet")
    page = _open(browser, f"{server}/corpus?profile={pid}&layer=1&neuron=0")
    page.get_by_role("button", name="Open in firing map").first.click(timeout=120_000)
    page.wait_for_selector("h2:has-text('Firing map')", timeout=180_000)
    quiet(page)
    want = dict(model="tiny-llama", prompt="The shirt costs $20 *bold* <b> and", policy="threshold", density="0.25")
    wait_for_url(page, {**want, "layer": "1"})
    page.wait_for_selector(".js-plotly-plot", timeout=120_000)
    assert re.fullmatch(r"3: .*\$", url_params(page).get("token", "")), page.url
    values = sidebar_values(page)
    assert {k: values[k] for k in want} == want
    assert main_value(page, "Layer") == "1" and re.fullmatch(r"3: .*\$", main_value(page, "Token"))
    assert page.locator("[data-testid='stException']").count() == 0
    page.close()


def test_a_paste_longer_than_the_prompt_box_is_cut_to_it_with_a_warning(server, browser):  # noqa: F811
    """26,457 characters into the prompt box: it holds the first MAX_PROMPT_CHARS and says so (before,
    the box refused the paste without a word and kept its old text)."""
    from sam_viz.spec import MAX_PROMPT_CHARS

    text = "".join(f"word{i} " for i in range(4000))[:26_457]
    page = _open(browser, f"{server}/?{urlencode(dict(model='tiny-llama', kernel='reference'))}")
    page.wait_for_selector(".js-plotly-plot", timeout=180_000)
    box = page.locator("[data-testid='stSidebar'] textarea").first
    box.fill(text)
    box.press("Control+Enter")
    warning = page.locator("[data-testid='stAlert']", has_text="26,457 characters")
    warning.wait_for(timeout=60_000)
    assert f"takes {MAX_PROMPT_CHARS:,}" in warning.inner_text()
    assert box.input_value() == text[:MAX_PROMPT_CHARS]
    assert page.locator("[data-testid='stException']").count() == 0
    page.close()
