"""Memory of the real server over many analyses: one Streamlit server of the app (bench.classroom.serve,
a temporary run store, calibration cache and profile folder) and one Chromium driven by Playwright.
Each analysis is a new prompt (never a cache hit) with models, policies and densities in turn exactly
as bench.memory.spec gives them; a fresh browser context opens its share link on the Firing map
(heatmap, token detail, density per token and layer) and then on Dense vs sparse (divergence, next
tokens, metrics), and every 10th also on Attribution (the page's default integrated gradients). The
server process's resident set (VmRSS in /proc/<pid>/status, no gc forced) is read every 20 analyses,
and every 2 s between them for the band it moves in (a single reading can land on a peak or a trough);
issue 15 asks that after 200 it be within 10% of after 20. Every page that shows an exception or an
error box, or never draws its figures, is counted and listed. Writes bench/results/memory_server.json.

    python -m bench.memory_server [--analyses 200] [--at 20] [--every 20] [--models tiny-llama,minilm]
                                  [--probe /tmp/probe.jsonl]

With --probe the server also writes, every 15 s, glibc's malloc figures, Python's allocated blocks and
objects and Streamlit's sessions (bench/memprobe/sitecustomize.py): what in its RSS grows. The server
is started as `make run` starts it, with glibc limited to two malloc arenas (MALLOC_ARENA_MAX=2, see
bench.classroom.serve); `MALLOC_ARENA_MAX=0 python -m bench.memory_server` measures glibc's defaults
(recorded in the result's malloc_env).

bench/memory.py measures the same sequence inside one process, without the server and the browser.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

from bench.classroom import SETTLED, launch, serve, stop
from bench.memory import DENSITIES, MODELS, POLICIES, spec

RESULTS = Path(__file__).resolve().parent / "results" / "memory_server.json"
PROBE = Path(__file__).resolve().parent / "memprobe"
TIMEOUT_MS = 300_000
FIGURES = f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {{n}} && {SETTLED}"
METRIC_TIME = ("[...document.querySelectorAll('[data-testid=\"stMetricLabel\"]')]"
               ".some(e => e.innerText.trim() === 'time')")
READY = {"": FIGURES.format(n=3),                                   # firing map: heatmap, token, density
         "compare": FIGURES.format(n=2) + " && document.querySelectorAll('[data-testid=\"stMetric\"]').length > 0",
         "attribution": f"{METRIC_TIME} && {SETTLED}"}


def server_rss_mib(pid: int) -> float:
    """The resident set of process `pid`, from /proc/<pid>/status (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def check_server_process(pid: int) -> str:
    """The command line of `pid`; refuses a wrapper: it must be the Python that runs streamlit."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    if not exe.startswith("python") or b"streamlit" not in argv:
        raise RuntimeError(f"process {pid} is {exe} {argv!r}, not the Python running streamlit")
    return " ".join(a.decode() for a in argv if a)


class Sampler(threading.Thread):
    """Reads a process's RSS every `interval` seconds, between the readings at the marks: the band
    that RSS moves in while analyses run (one reading alone can land on a peak or a trough)."""

    def __init__(self, pid: int, interval: float = 2.0):
        super().__init__(daemon=True)
        self.pid, self.interval, self.stopped = pid, interval, threading.Event()
        self.seen, self.lock = [], threading.Lock()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                rss = server_rss_mib(self.pid)
            except OSError:                   # the process has gone; the main loop reports it
                return
            with self.lock:
                self.seen.append(rss)

    def take(self) -> list[float]:
        """The readings since the last take."""
        with self.lock:
            seen, self.seen = self.seen, []
        return seen


def link(base: str, path: str, i: int, models: tuple[str, ...]) -> str:
    s = spec(i, models)
    query = {"model": s.model, "prompt": s.prompt, "policy": s.policy, "density": f"{s.density:g}"}
    return f"{base}/{path}?{urlencode(query)}"


def visit(page, url: str, ready: str) -> list[str]:
    """Open `url`, wait until `ready` holds in the page; the problems seen (exceptions, error boxes,
    a page that never got ready), one line each."""
    problems = []
    try:
        page.goto(url, wait_until="commit")
        try:        # Streamlit's first load after a server start can come back blank: load again
            page.wait_for_selector("[data-testid='stSidebar']", timeout=60_000)
        except PlaywrightError:
            page.reload()
        page.wait_for_function(ready, timeout=TIMEOUT_MS)
    except PlaywrightError as exc:
        problems.append(f"not ready: {str(exc).splitlines()[0]} | page: {page.inner_text('body')[-600:]!r}")
    for e in page.locator("[data-testid='stException']").all():
        problems.append(f"exception: {e.inner_text()[:600]!r}")
    for e in page.locator("[data-testid='stAlertContentError']").all():
        problems.append(f"error: {e.inner_text()[:300]!r}")
    return problems


def analyse(browser, base: str, i: int, models: tuple[str, ...], attribute_every: int) -> list[str]:
    """The i-th analysis in a fresh browser context: Firing map, Dense vs sparse, now and then
    Attribution. The problems seen, each prefixed with the page's link."""
    paths = ["", "compare"] + (["attribution"] if attribute_every and i % attribute_every == attribute_every - 1
                               else [])
    context = browser.new_context(viewport={"width": 1400, "height": 1800})
    page, problems = context.new_page(), []
    try:
        for path in paths:
            url = link(base, path, i, models)
            problems += [f"{url}: {p}" for p in visit(page, url, READY[path])]
    finally:
        context.close()
    return problems


def probe_env(path: Path) -> dict:
    """The server's environment for bench/memprobe: its sitecustomize on PYTHONPATH, writing to `path`."""
    paths = [str(PROBE), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(paths), "SAM_VIZ_MEM_PROBE": str(path.resolve())}


def measure(n: int, at: int, every: int, models: tuple[str, ...] = MODELS, attribute_every: int = 10,
            probe: Path | None = None) -> dict:
    """Run n analyses through a real server; its RSS (MiB) every `every` analyses and at `at`; with
    `probe`, the server writes bench/memprobe's memory figures there."""
    tmp = Path(tempfile.mkdtemp(prefix="sam-viz-memory-"))
    proc, base = serve({"SAM_VIZ_RUN_DB": str(tmp / "runs.sqlite"), "SAM_VIZ_CACHE_DIR": str(tmp / "cache"),
                        "SAM_VIZ_PROFILE_DIR": str(tmp / "profiles"), **(probe_env(probe) if probe else {})})
    series, problems, errored, t0 = [], [], 0, time.perf_counter()
    try:
        command = check_server_process(proc.pid)
        sampler = Sampler(proc.pid)
        sampler.start()
        with sync_playwright() as p:
            browser = launch(p)
            for i in range(n):
                if proc.poll() is not None:
                    raise RuntimeError(f"the server exited with status {proc.returncode} at analysis {i}")
                seen = analyse(browser, base, i, models, attribute_every)
                errored += bool(seen)
                problems += seen
                if (i + 1) % every == 0 or i + 1 in (at, n):
                    rss = server_rss_mib(proc.pid)
                    band = sampler.take() + [rss]
                    series.append({"analyses": i + 1, "rss_mib": round(rss, 1), "min_mib": round(min(band), 1),
                                   "max_mib": round(max(band), 1), "seconds": round(time.perf_counter() - t0, 1)})
                    print(f"{series[-1]} errored {errored}", file=sys.stderr, flush=True)
            browser.close()
        sampler.stopped.set()
    finally:
        stop(proc)
    return summary(series, n, at) | {
        "errored_analyses": errored, "problems": problems, "models": list(models), "policies": list(POLICIES),
        "densities": list(DENSITIES), "attribution_every": attribute_every,
        "seconds": round(time.perf_counter() - t0, 1), "server": command}


def summary(series: list[dict], n: int, at: int) -> dict:
    """RSS after `at` and after n analyses and the growth between (issue 15's measure); the highest
    RSS sampled after `at`, and its growth over the reading at `at`."""
    rss = {row["analyses"]: row["rss_mib"] for row in series}
    peak = max(row["max_mib"] for row in series if row["analyses"] > at) if n > at else rss[n]
    return {"analyses": n, "at": at, "rss_mib_at": rss[at], "rss_mib_end": rss[n],
            "growth": round(rss[n] / rss[at] - 1, 4), "max_mib_after_at": peak,
            "growth_to_max": round(peak / rss[at] - 1, 4), "series": series,
            "note": "rss_mib: the server's VmRSS read right after that many analyses; min_mib / max_mib: the "
                    "lowest and highest of the readings every 2 s since the previous row"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--analyses", type=int, default=200)
    ap.add_argument("--at", type=int, default=20)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--attribute-every", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--probe", type=Path, help="the server writes bench/memprobe's memory figures here (JSON lines)")
    args = ap.parse_args()
    if not 0 < args.at <= args.analyses or args.every < 1:
        ap.error("--at must be in 1..--analyses and --every at least 1")
    result = measure(args.analyses, args.at, args.every, tuple(args.models.split(",")), args.attribute_every,
                     args.probe)
    result["cpus"] = os.cpu_count()
    result["malloc_env"] = {"MALLOC_ARENA_MAX": "2", **{k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}   # glibc's tunables
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=1))


if __name__ == "__main__":
    main()
