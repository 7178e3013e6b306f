"""Time from opening a share URL to all figures of the firing map drawn, in a real browser
(Debian's Chromium via Playwright), for minilm at 64 and 512 tokens, with the model already loaded
(warm cache) and a prompt not analyzed before; the time from a density change (the sidebar slider,
one step by keyboard) to all figures redrawn, with where that time goes; and the size of the HTML
export.

    python -m bench.app_timing [--repeats 3] [--only density|start]

It also times a server start (`streamlit run app.py`, as `make run` starts it) to the firing map drawn,
and prints each density change's websocket timeline, which tells the server's part from the browser's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from urllib.parse import urlencode

from bench.foundation import prompt_of
from sam_viz.models import load_model

FIGURES_DRAWN = ("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 3"
                 " && !document.querySelector('[data-testid=\"stStatusWidget\"]')")
# The firing heatmap's picture (plotly draws a heatmap as an image): its data URL changes when the map is
# redrawn with other values. The figures of the run before stay on the page until the new ones come,
# so a rerun is timed to the heatmap's new picture, not to three figures being present.
HEAT_PICTURE = ("(() => { const i = document.querySelector('.js-plotly-plot image');"
                " const h = i ? (i.getAttribute('href') || '') : ''; return h.length + ':' + h.slice(-200); })()")


def _redrawn(page, before: str) -> None:
    """Until the firing heatmap shows a picture other than `before`, and every figure is drawn."""
    page.wait_for_function(f"{HEAT_PICTURE} !== {json.dumps(before)} && {FIGURES_DRAWN}", timeout=300_000)


def _serve(port: int, db: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "SAM_VIZ_RUN_DB": db, "MALLOC_ARENA_MAX": "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def _time_to_figures(browser, url: str) -> float:
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_function(FIGURES_DRAWN, timeout=300_000)
    elapsed = time.perf_counter() - t0
    page.close()
    return elapsed


def _time_in_session(page, prompt: str, n_tokens: int) -> float:
    """Type a new prompt into the open page's sidebar (Ctrl+Enter = Run) and wait for its figures."""
    box = page.get_by_role("textbox", name="Prompt", exact=True)
    box.fill(prompt)
    before = page.evaluate(HEAT_PICTURE)
    t0 = time.perf_counter()
    box.press("Control+Enter")
    page.locator("[data-testid='stCaptionContainer']", has_text=f"· {n_tokens} tokens ·").first.wait_for(
        timeout=300_000)
    _redrawn(page, before)
    return time.perf_counter() - t0


def _time_density_change(page, density: float) -> float:
    """One step right on the density slider (keyboard), until the firing map says the new density
    and every figure is drawn again. A key press that lands while the page is still settling is
    not taken by the slider; it is pressed again (and the clock restarted) until it is."""
    sel = "[data-testid='stSidebar'] [data-testid='stSlider'] input[type='range']"
    for _ in range(5):
        page.wait_for_timeout(1000)              # let the last rerun settle before the key press
        before = page.evaluate(HEAT_PICTURE)
        t0 = time.perf_counter()
        page.locator(sel).first.press("ArrowRight")
        try:
            page.wait_for_function(f"Math.abs(document.querySelector(\"{sel}\").value - {density}) < 1e-9",
                                   timeout=3000)
            break
        except Exception:  # noqa: BLE001 - the press was not taken; try again
            continue
    page.locator("[data-testid='stCaptionContainer']", has_text=f"at density {density:g} ·").first.wait_for(
        timeout=300_000)
    _redrawn(page, before)
    return time.perf_counter() - t0


class Frames:
    """The websocket frames the server sends, with their arrival times (perf_counter) and sizes: the
    last frame of a rerun is when the server finished; what comes after it is the browser's time."""

    def __init__(self, page):
        self.rows: list[tuple[float, int]] = []
        page.on("websocket", lambda ws: ws.on("framereceived", self._add))

    def _add(self, payload) -> None:
        self.rows.append((time.perf_counter(), len(payload)))

    def since(self, t0: float) -> list[tuple[float, int]]:
        return [(t - t0, n) for t, n in self.rows if t >= t0]


def density_change(browser, base: str, m, repeats: int) -> list[float]:
    """Warm: the model is loaded and the page drawn; each step asks for a density not analysed yet.
    Prints each change's websocket timeline: first frame, largest frame, last frame (the server's
    part) and all figures drawn (the rest is the browser's)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    frames = Frames(page)
    page.goto(base + urlencode({"prompt": prompt_of(m, 64), "model": "minilm", "density": "0.5"}))
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=300_000)
    page.wait_for_function(FIGURES_DRAWN, timeout=300_000)
    times, server = [], []
    for r in range(repeats):
        start = len(frames.rows)
        elapsed = _time_density_change(page, round(0.5 + 0.05 * (r + 1), 2))
        done = time.perf_counter()
        rows = [(t, n) for t, n in frames.rows[start:] if t <= done]
        t0 = done - elapsed
        rel = [(t - t0, n) for t, n in rows if t >= t0]
        if rel:
            big = max(rel, key=lambda x: x[1])
            server.append(rel[-1][0])
            print(f"    change {r + 1}: {len(rel)} frames, {sum(n for _, n in rel) / 1e6:.2f} MB; first at "
                  f"{rel[0][0]:.2f} s, largest ({big[1] / 1e6:.2f} MB) at {big[0]:.2f} s, last at {rel[-1][0]:.2f} s;"
                  f" drawn at {elapsed:.2f} s")
        times.append(elapsed)
    if server:
        print(f"  server's part (key press to its last frame): median {statistics.median(server):.2f} s; "
              f"browser's part after it: median {statistics.median(times) - statistics.median(server):.2f} s")
    page.close()
    return times


def server_start(port: int, db: str, m) -> float:
    """Seconds from starting `streamlit run` (as make run does) to the firing map's figures drawn in a
    browser that asks for the page as soon as the server answers."""
    from playwright.sync_api import sync_playwright

    t0 = time.perf_counter()
    proc = _serve(port, db)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(f"http://127.0.0.1:{port}/")
            for _ in range(3):               # Streamlit's first load after a start can come back blank
                try:
                    page.wait_for_function(FIGURES_DRAWN, timeout=60_000)
                    break
                except Exception:  # noqa: BLE001 - blank first load: load again
                    page.reload()
            elapsed = time.perf_counter() - t0
            browser.close()
    finally:
        proc.terminate()
        proc.wait()
    return elapsed


def server_side(m, repeats: int) -> None:
    """Where the time of a density change goes on the server: the analysis (dense and sparse
    passes), the three firing-map figures, and their JSON (what travels to the browser)."""
    from sam_viz import RunSpec, analyze
    from sam_viz.figures import firing

    prompt, rows = prompt_of(m, 64), []
    analyze(m, RunSpec(prompt=prompt, model="minilm", density=0.5))
    for r in range(repeats):
        t0 = time.perf_counter()
        a = analyze(m, RunSpec(prompt=prompt, model="minilm", density=round(0.5 + 0.05 * (r + 1), 2)))
        t1 = time.perf_counter()
        figs = [firing.firing_heatmap(a, 0), firing.token_neurons(a, 0, 0), firing.density_tokens_layers(a)]
        t2 = time.perf_counter()
        size = sum(len(f.fig.to_json()) for f in figs)
        t3 = time.perf_counter()
        rows.append((a.timings_ms["dense"], a.timings_ms["sparse"], (t1 - t0) * 1000, (t2 - t1) * 1000,
                     (t3 - t2) * 1000, size))
    med = [statistics.median(col) for col in zip(*rows)]
    print(f"  server side, median of {repeats}: analysis {med[2]:.0f} ms (dense pass {med[0]:.0f}, sparse pass "
          f"{med[1]:.0f}), figures {med[3]:.0f} ms, figure JSON {med[4]:.0f} ms ({med[5] / 1e6:.2f} MB)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.app_timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["density", "start"], help="only the density-change timing, or only "
                        "the server start")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    m = load_model("minilm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.only != "density":
        _report("server start (streamlit run) -> firing map drawn on minilm",
                [server_start(port, os.path.join(tempfile.mkdtemp(), "runs.sqlite"), m) for _ in range(args.repeats)])
        if args.only == "start":
            return
    proc = _serve(port, os.path.join(tempfile.mkdtemp(), "runs.sqlite"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            base = f"http://127.0.0.1:{port}/?"
            _time_to_figures(browser, base + urlencode({"prompt": "warm up the model cache", "model": "minilm"}))
            _report("minilm  64 tokens: density slider one step -> figures drawn (warm)",
                    density_change(browser, base, m, max(args.repeats, 5)))
            server_side(m, max(args.repeats, 5))
            if args.only == "density":
                browser.close()
                return
            for n in (64, 512):
                times = []
                for r in range(args.repeats):     # a new prompt each time: the analysis is not cached
                    prompt = f"Run {r}. " + prompt_of(m, n - 4)
                    times.append(_time_to_figures(browser, base + urlencode({"prompt": prompt, "model": "minilm"})))
                _report(f"minilm {n:>3} tokens: open the share URL in a new tab -> figures drawn", times)
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(base + urlencode({"prompt": "warm", "model": "minilm"}))
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=300_000)
            for n in (64, 512):
                times = []
                for r in range(args.repeats):
                    prompt = f"Again {r}. " + prompt_of(m, n - 4 - 3 * (r + 1))   # a new token count each run
                    n_tok = len(m.encode(prompt)["input_ids"][0])
                    times.append(_time_in_session(page, prompt, n_tok))
                _report(f"minilm {n:>3} tokens: Run (Ctrl+Enter in the prompt) -> figures drawn", times)
            browser.close()
    finally:
        proc.terminate()

    from sam_viz import RunSpec, analyze, export
    from sam_viz.report import report_plots
    a = analyze(m, RunSpec(prompt=prompt_of(m, 64), model="minilm", policy="topk", density=0.5))
    html = export.to_html(a, report_plots(a))
    print(f"HTML export, minilm 64 tokens: {len(html.encode()):,} bytes ({len(report_plots(a))} figures)")


def _report(what: str, times: list[float]) -> None:
    print(f"{what}: median {statistics.median(times):.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
