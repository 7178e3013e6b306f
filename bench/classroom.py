"""A classroom at once: one Streamlit server and eight browser sessions (Playwright contexts in one
Debian Chromium) that open their share links at the same moment, each with its own model, policy
and density; three of them save their run on the Runs page. Measured: the time until every session
shows all its figures (or its saved run's id), against each session opened alone on the same warm
server (models loaded, prompts not analysed before). Writes bench/results/classroom.json.

    python -m bench.classroom [--repeats 2]

tests/test_classroom.py drives the same sessions and checks each one's numbers; this script times.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

from sam_viz import RunSpec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "classroom.json"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PROMPT = "The lighthouse keeper counted ships. The storm lasted all night."
FIGURES = {"compare": 2, "runs": 0}
SETTLED = "!document.querySelector('[data-testid=\"stStatusWidget\"]')"
SAVED_AS = re.compile(r"Saved as ([A-Za-z0-9_-]{12})")


@dataclass(frozen=True)
class Session:
    """One student: a page opened by share link; `runs` sessions press Save run."""
    page: str
    model: str
    policy: str
    density: float

    def spec(self, prompt: str = PROMPT) -> RunSpec:
        return RunSpec(prompt=prompt, model=self.model, policy=self.policy, density=self.density)

    def url(self, base: str, prompt: str = PROMPT) -> str:
        query = {"model": self.model, "prompt": prompt, "policy": self.policy, "density": f"{self.density:g}"}
        return f"{base}/{self.page}?{urlencode(query)}"


CLASS = (Session("compare", "tiny-llama", "topk", 0.3), Session("compare", "tiny-gpt2", "threshold", 0.4),
         Session("compare", "tiny-qwen2", "threshold", 0.2), Session("compare", "minilm", "topk", 0.25),
         Session("compare", "demo-lm", "threshold", 0.3), Session("runs", "tiny-mixtral", "topk", 0.5),
         Session("runs", "tiny-opt", "topk", 0.7), Session("runs", "tiny-bert", "topk", 0.6))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(env: dict) -> tuple[subprocess.Popen, str]:
    """A Streamlit server of the app on a free port, once it answers its health check; with glibc's
    malloc arenas limited as `make run` limits them (MALLOC_ARENA_MAX=0 in `env` or the environment:
    glibc's defaults)."""
    port = free_port()
    env = {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"), **env}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false"],
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(480):
        try:
            urllib.request.urlopen(f"{base}/_stcore/health", timeout=2)
            return proc, base
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("the Streamlit server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def launch(playwright):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    return playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)


def warm_up(browser, base: str, sessions=CLASS, timeout_s: float = 300) -> None:
    """Load every model once on the server (and get past the blank first page load after start)."""
    run_class(browser, base, sessions, prompt="Warm up.", timeout_s=timeout_s)


def run_class(browser, base: str, sessions=CLASS, prompt: str = PROMPT, timeout_s: float = 300) -> list[dict]:
    """Open every session at once, each in its own browser context (its own Streamlit session); then
    wait for each to show all its figures (`runs`: press Save run and wait for the id). Per session:
    seconds from the first open to done, the metrics shown (label -> text), the saved id, errors."""
    pages = []
    for s in sessions:
        page = browser.new_context(viewport={"width": 1400, "height": 1800}).new_page()
        pages.append(page)
    t0 = time.perf_counter()
    for s, page in zip(sessions, pages):
        page.goto(s.url(base, prompt), wait_until="commit")
    out = [_finish(s, page, t0, timeout_s) for s, page in zip(sessions, pages)]
    for page in pages:
        page.context.close()
    return out


def _finish(s: Session, page, t0: float, timeout_s: float) -> dict:
    deadline_ms = lambda: max(1_000, (t0 + timeout_s - time.perf_counter()) * 1000)  # noqa: E731
    saved, stuck = None, None
    try:
        _arrive(page, deadline_ms)
        if s.page == "runs":
            page.get_by_role("button", name="Save run").click(timeout=deadline_ms())
            alert = page.locator("[data-testid='stAlert']", has_text="Saved as")
            alert.wait_for(timeout=deadline_ms())
            saved = SAVED_AS.search(alert.inner_text().replace("`", "")).group(1)
        else:
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= "
                                   f"{FIGURES[s.page]} && document.querySelectorAll('[data-testid=\"stMetric\"]')"
                                   f".length > 0 && {SETTLED}", timeout=deadline_ms())
    except PlaywrightError as exc:                  # a session that never finished: the caller reports it
        stuck = f"{type(exc).__name__}: {str(exc).splitlines()[0]} | page: {page.inner_text('body')[-1500:]!r}"
    done = time.perf_counter() - t0
    metrics = {m.locator("[data-testid='stMetricLabel']").inner_text().strip():
               m.locator("[data-testid='stMetricValue']").inner_text().strip()
               for m in page.locator("[data-testid='stMetric']").all()}
    return {"session": s, "seconds": done, "metrics": metrics, "saved": saved, "stuck": stuck,
            "exceptions": page.locator("[data-testid='stException']").count(),
            "errors": [e.inner_text() for e in page.locator("[data-testid='stAlertContentError']").all()]}


def _arrive(page, deadline_ms) -> None:
    """The page's header; Streamlit's first load after a server start can come back blank: load again."""
    try:
        page.wait_for_selector("h2", timeout=min(60_000, deadline_ms()))
    except Exception:  # noqa: BLE001 - one reload, then the deadline decides
        page.reload()
        page.wait_for_selector("h2", timeout=deadline_ms())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sam-viz-classroom-"))
    proc, base = serve({"SAM_VIZ_RUN_DB": str(tmp / "runs.sqlite")})
    try:
        with sync_playwright() as p:
            browser = launch(p)
            warm_up(browser, base)
            alone, together = [], []
            for r in range(args.repeats):
                alone.append([run_class(browser, base, [s], prompt=f"{PROMPT} Alone {r}.")[0]["seconds"]
                              for s in CLASS])
                together.append(max(x["seconds"] for x in run_class(browser, base, prompt=f"{PROMPT} Together {r}.")))
            browser.close()
    finally:
        stop(proc)
    per_session = [statistics.median(col) for col in zip(*alone)]
    result = {"sessions": [f"{s.page}: {s.model} {s.policy} {s.density:g}" for s in CLASS],
              "alone_s": [round(x, 2) for x in per_session], "alone_max_s": round(max(per_session), 2),
              "alone_sum_s": round(sum(per_session), 2),
              "together_s": round(statistics.median(together), 2), "together_all_s": [round(x, 2) for x in together],
              "repeats": args.repeats, "cpus": os.cpu_count(),
              "note": "seconds from opening the link(s) to every figure drawn (runs: the saved id shown); "
                      "warm server, prompts not analysed before; together = the 8 at once, alone = one by one"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
