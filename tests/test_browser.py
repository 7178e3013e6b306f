"""A real browser: start the app on localhost, open a share URL in Debian's Chromium (driven by
Playwright), wait for the firing heatmap and the density chart, and take screenshots."""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = os.environ.get("SAM_VIZ_SCREENSHOTS")        # keep screenshots here when set (for a look by eye)

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (apt-get install chromium); browser test skipped"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profile_dir(tmp_path_factory) -> Path:
    """The server's SAM_VIZ_PROFILE_DIR: the same folder for the server and the tests that write into it."""
    path = tmp_path_factory.getbasetemp() / "browser-profiles"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAM_VIZ_PROFILE_DIR": str(profile_dir(tmp_path_factory)),
           "SAM_VIZ_RUN_DB": str(tmp_path_factory.mktemp("runs") / "runs.sqlite")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the Streamlit server did not start: " + proc.stdout.read().decode()[-2000:])
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(url)
    try:   # Streamlit's first load after start can come back blank: wait, and load once more if so
        page.wait_for_selector("[data-testid='stSidebar']", timeout=60_000)
    except Exception:  # noqa: BLE001 - retried once below
        page.reload()
        page.wait_for_selector("[data-testid='stSidebar']", timeout=60_000)
    return page


def _wait_for_titles(page, titles, timeout=120_000):
    for title in titles:
        page.wait_for_selector(f".js-plotly-plot .gtitle:has-text('{title}')", timeout=timeout)


def _shot(page, tmp_path, name):
    path = Path(SHOTS or tmp_path) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


@pytest.mark.parametrize("name", ["density", "compare", "routing", "attribution", "speed", "runs"])
def test_other_pages_render(server, browser, tmp_path, name):
    """Runs first on a fresh server: a deep link before app.py has ever run (Streamlit's legacy
    pages/ router is still on then)."""
    query = urlencode({"model": "tiny-llama", "prompt": "One two three four five six.", "policy": "threshold",
                       "density": "0.4"})
    page = _open(browser, f"{server}/{name}?{query}")
    page.wait_for_selector("h2", timeout=120_000)
    if name != "runs":
        page.wait_for_selector(".js-plotly-plot", timeout=120_000)
    page.wait_for_timeout(1500)
    _shot(page, tmp_path, name)
    assert page.locator("[data-testid='stException']").count() == 0
    assert page.get_by_text("Page not found").count() == 0
    nav = page.locator("[data-testid='stSidebarNav']").inner_text()
    assert "Firing map" in nav and "Speed" in nav and "Runs and sharing" in nav  # the app's navigation,
    assert "shared" not in nav                                                   # not pages/ files
    page.close()


def test_share_url_shows_firing_heatmap_and_density_chart(server, browser, tmp_path):
    query = urlencode({"model": "minilm", "prompt": "The quick brown fox jumps over the lazy dog. It ran away.",
                       "policy": "topk", "density": "0.25", "layer": "2"})
    page = _open(browser, f"{server}/?{query}")
    _wait_for_titles(page, ["which neurons the sparse model computed", "Share of neurons computed per token"])
    _shot(page, tmp_path, "firing")
    assert page.locator(".js-plotly-plot").count() >= 3
    nav = page.locator("[data-testid='stSidebarNav']").inner_text()
    assert "Firing map" in nav and "Speed" in nav and "Runs and sharing" in nav and "shared" not in nav
    assert page.locator("[data-testid='stException']").count() == 0
    assert page.get_by_text("Page not found").count() == 0
    page.close()


MARKDOWN_PROMPT = ("The shirt costs $20 and the hat costs $15 at the market. *bold* _it_ `code` <b>x</b> "
                   "[a](http://x)")


def _no_formula(page):
    main = page.locator("[data-testid='stMain']")
    assert main.locator(".katex, math").count() == 0
    assert page.locator("[data-testid='stException']").count() == 0


def test_markdown_signs_in_the_prompt_are_shown_as_text(server, browser, tmp_path):
    """Attribution's token rows, the firing map and Dense vs sparse with a prompt full of `$` and
    markdown: tokens are text (no KaTeX formula, no emphasis, code or link made of them)."""
    from transformers import AutoTokenizer

    from sam_viz.models.loading import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())              # tiny-llama's tokenizer
    tokens = tok.convert_ids_to_tokens(tok(MARKDOWN_PROMPT, add_special_tokens=False)["input_ids"])
    assert tokens[3:5] == ["$", "20"]
    query = urlencode({"model": "tiny-llama", "prompt": MARKDOWN_PROMPT, "policy": "topk", "density": "0.5"})
    page = _open(browser, f"{server}/attribution?{query}")
    page.get_by_text("Sparse - dense", exact=True).wait_for(timeout=180_000)    # the last of the three rows
    page.wait_for_timeout(1000)
    _shot(page, tmp_path, "attribution-markdown-prompt")
    _no_formula(page)
    spans = page.locator("[data-testid='stMain'] [data-testid='stMarkdownContainer'] span[title]")
    assert spans.count() == 3 * len(tokens) and spans.all_inner_texts()[:len(tokens)] == tokens
    rows = page.locator("[data-testid='stMain'] [data-testid='stMarkdownContainer']:has(span[title])")
    assert rows.count() == 3 and rows.locator("em, code, a, b, del").count() == 0
    page.close()

    page = _open(browser, f"{server}/?{query}")
    _wait_for_titles(page, ["which neurons the sparse model computed"])
    _no_formula(page)
    page.close()

    page = _open(browser, f"{server}/compare?{query}")
    page.get_by_role("button", name="Continue with both models").click(timeout=180_000)
    dense = page.locator("[data-testid='stMain'] p").filter(has_text=re.compile(r"^Dense:"))
    dense.wait_for(timeout=120_000)
    _shot(page, tmp_path, "compare-markdown-prompt")
    _no_formula(page)
    assert "##" not in dense.inner_text()


def test_a_saved_run_stays_the_saved_run_through_the_whole_menu(server, browser, tmp_path):
    """Save a run on the Runs page, open its link, then click every page of the menu: each page of the
    analysis shows the saved-run line and the URL keeps run=<id>; after the tour and the claims page
    (which show runs of their own) Runs still shows the saved run and does not offer to save it again."""
    query = urlencode({"model": "tiny-llama", "prompt": "Seven eight nine ten eleven.", "policy": "threshold",
                       "density": "0.4"})
    page = _open(browser, f"{server}/runs?{query}")
    page.get_by_role("button", name="Save run").click()
    saved = page.locator("[data-testid='stAlert']", has_text="Saved as")
    saved.wait_for(timeout=120_000)
    run_id = saved.locator("code").inner_text()
    page.close()

    page = _open(browser, f"{server}/?run={run_id}")
    links = page.locator("[data-testid='stSidebarNav'] a")
    names = [links.nth(i).inner_text().strip().splitlines()[-1] for i in range(links.count())]   # after the icon
    assert names == ["Firing map", "Classroom tour", "Density", "Dense vs sparse", "Routing", "Whole model",
                     "Attribution", "Speed", "Demo LM: the claim", "Corpus", "Runs and sharing"]
    own_views = {"Classroom tour", "Demo LM: the claim", "Corpus"}     # pages that show runs (profiles) of their own
    for name in [n for n in names if n not in own_views] + ["Classroom tour", "Demo LM: the claim", "Corpus",
                                                            "Runs and sharing"]:
        page.locator("[data-testid='stSidebarNav'] a", has_text=name).click()
        if name in own_views:                                      # visiting them does not leave the saved run
            page.wait_for_timeout(3000)
            continue
        page.wait_for_selector(f"h2:has-text('{name}')", timeout=120_000)
        page.wait_for_function(f"location.search.includes('run={run_id}')", timeout=60_000)
        line = page.locator("[data-testid='stAlert']", has_text="Saved run").filter(has_text=run_id)
        line.wait_for(timeout=60_000)
        assert line.count() == 1, name
        assert page.locator("[data-testid='stException']").count() == 0, name
    page.wait_for_selector("h3:has-text('Export')", timeout=60_000)             # the Runs page drawn to its end
    page.wait_for_timeout(1000)
    _shot(page, tmp_path, "saved-run-runs-page")
    assert page.get_by_role("button", name="Save run").count() == 0
    assert page.get_by_text(f"This is saved run {run_id}").count() == 1
    page.close()


def test_tour_step_opens_from_a_link(server, browser, tmp_path):
    """A teacher's link to step 4 of the classroom tour shows that step and its figure; Next moves the
    URL on; "Open this in the app" carries the step's settings to the page it names."""
    page = _open(browser, f"{server}/tour?step=4")
    page.locator("strong", has_text="Step 4 of 9").wait_for(timeout=180_000)
    _wait_for_titles(page, ["Next token at the last position"])
    _shot(page, tmp_path, "tour-step-4")
    assert page.locator(".js-plotly-plot").count() >= 1
    assert page.locator("[data-testid='stException']").count() == 0
    assert page.get_by_text("Page not found").count() == 0
    assert "Classroom tour" in page.locator("[data-testid='stSidebarNav']").inner_text()

    page.get_by_role("button", name="Next").click()
    page.locator("strong", has_text="Step 5 of 9").wait_for(timeout=120_000)
    page.wait_for_url(re.compile(r"step=5"), timeout=30_000)
    page.get_by_role("button", name="Back").click()
    page.locator("strong", has_text="Step 4 of 9").wait_for(timeout=120_000)
    page.get_by_role("button", name="Open this in the app").click(timeout=120_000)
    page.locator("h2", has_text="Dense vs sparse").wait_for(timeout=120_000)
    page.wait_for_url(re.compile(r"/compare\?.*model=demo-lm"), timeout=30_000)
    assert "density=0.1" in page.url and "step=" not in page.url
    assert page.locator("[data-testid='stException']").count() == 0
    page.close()


def test_a_neuron_share_link_opens_the_neuron_view(server, browser, tmp_path, tmp_path_factory):
    """A hand-built profile, its neuron link opened cold: the neuron tab, the top contexts with the
    firing token marked and `$ * <` shown as text, the histogram and logit effects; a correlated
    neuron's link opens that neuron."""
    from test_profile_view import PID, write_profile

    if not (profile_dir(tmp_path_factory) / PID).exists():
        write_profile(profile_dir(tmp_path_factory))
    page = _open(browser, f"{server}/corpus?profile={PID}&layer=0&neuron=1")
    _wait_for_titles(page, ["Layer 0, neuron 1: distribution of h"])           # the overview tab is hidden
    main = page.locator("[data-testid='stMain']")
    assert main.locator("[role='tab'][aria-selected='true']").inner_text().strip() == "Neuron"
    page.get_by_role("link", name="neuron 2 · phi -1.00 · together on 0 of 10 tokens").click()
    page.wait_for_url(re.compile(r"neuron=2"), timeout=60_000)
    _wait_for_titles(page, ["Layer 0, neuron 2: distribution of h"])
    page.get_by_role("tab", name="Overview").click()
    _wait_for_titles(page, ["Hot neurons: how few carry the firing"])
    page.wait_for_function("!location.search.includes('neuron=')", timeout=30_000)
    page.goto(f"{server}/corpus?profile={PID}&layer=0&neuron=0")
    _wait_for_titles(page, ["Layer 0, neuron 0: distribution of h", "Layer 0, neuron 0: logit effects"])
    marks = main.locator("mark")
    marks.first.wait_for(timeout=60_000)
    assert marks.count() >= 3 and marks.first.inner_text().strip() == "$"
    assert "The shirt costs $20 *bold* <b> and" in main.inner_text()
    _no_formula(page)
    assert page.locator("[data-testid='stException']").count() == 0
    _shot(page, tmp_path, "corpus-neuron")
    page.close()


XSS_PROMPT = '<img src=x onerror="window.__xss=1;alert(1)"> <svg onload="window.__xss=2"> </script><b>bold</b>'


def _no_script_ran(page, dialogs):
    assert dialogs == [] and page.evaluate("window.__xss") is None
    assert page.locator("[data-testid='stException']").count() == 0


def test_markup_in_a_prompt_never_runs_in_the_app_or_the_export(server, browser, tmp_path):
    """Issue 15: a prompt of HTML with event handlers, on the Firing map, on Attribution (tokens as
    coloured HTML spans) and in the exported HTML file opened from disk: shown as text, no handler
    runs (no dialog, the global the handlers would set stays unset)."""
    from conftest import shared
    from sam_viz import RunSpec, analyze
    from sam_viz.export import to_html
    from sam_viz.report import report_plots

    query = urlencode({"model": "tiny-llama", "prompt": XSS_PROMPT, "policy": "topk", "density": "0.5"})
    for path, ready in (("", lambda p: _wait_for_titles(p, ["which neurons the sparse model computed"])),
                        ("attribution", lambda p: p.get_by_text("Sparse - dense", exact=True).wait_for(timeout=180_000))):
        page, dialogs = _open(browser, f"{server}/{path}?{query}"), []     # the global flag catches any earlier run
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        ready(page)
        page.wait_for_timeout(1500)
        _no_script_ran(page, dialogs)
        assert page.locator("[data-testid='stMain'] img[src='x'], [data-testid='stMain'] svg[onload]").count() == 0
        page.close()

    a = analyze(shared("tiny-llama"), RunSpec(prompt=XSS_PROMPT, model="tiny-llama", kernel="reference"))
    file = tmp_path / "export.html"
    file.write_text(to_html(a, report_plots(a)), encoding="utf-8")
    page, dialogs = browser.new_page(viewport={"width": 1400, "height": 1800}), []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(file.as_uri())
    page.wait_for_selector(".js-plotly-plot .gtitle", timeout=60_000)
    page.wait_for_timeout(1000)
    _no_script_ran(page, dialogs)
    assert XSS_PROMPT in page.locator("pre").first.inner_text()
    page.close()
