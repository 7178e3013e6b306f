"""Time from opening a share URL to all figures of the firing map drawn, in a real browser
(Debian's Chromium via Playwright), for minilm at 64 and 512 tokens, with the model already loaded
(warm cache) and a prompt not analyzed before. Also the size of the HTML export.

    python -m bench.app_timing [--repeats 3]
"""
from __future__ import annotations

import argparse
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
from models import load_model


def _serve(port: int, db: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "SAM_VIZ_RUN_DB": db},
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
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 3"
                           " && !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=300_000)
    elapsed = time.perf_counter() - t0
    page.close()
    return elapsed


def _time_in_session(page, prompt: str, n_tokens: int) -> float:
    """Type a new prompt into the open page's sidebar (Ctrl+Enter = Run) and wait for its figures."""
    box = page.get_by_role("textbox", name="Prompt", exact=True)
    box.fill(prompt)
    t0 = time.perf_counter()
    box.press("Control+Enter")
    page.get_by_text(f"· {n_tokens} tokens ·").wait_for(timeout=300_000)
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 3"
                           " && !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=300_000)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.app_timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    m = load_model("minilm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _serve(port, os.path.join(tempfile.mkdtemp(), "runs.sqlite"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            base = f"http://127.0.0.1:{port}/?"
            _time_to_figures(browser, base + urlencode({"prompt": "warm up the model cache", "model": "minilm"}))
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
