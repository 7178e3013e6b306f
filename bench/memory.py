"""Memory over many analyses: the resident set (VmRSS) of one process that runs analyses exactly as
the app's pages do (pages/_shared.cached_analysis: the shared model and analysis caches, on-demand
threshold calibration, the default kernel), draws each one's firing map and divergence figures,
and now and then an attribution, with a new prompt every time and policies and densities in turn.
After the first N analyses every cache has filled (models loaded, the analysis LRU full, one
threshold set per model and density); from then on the RSS should stay flat: caches bounded, no
traces, hooks or kernel layouts left behind. Writes bench/results/memory.json.

    python -m bench.memory [--analyses 200] [--at 20] [--models tiny-llama,minilm,demo-lm] [--out PATH]

The same sequence on the real server, driven by a browser: python -m bench.memory_server (bench/memory_server.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time
from pathlib import Path

from sam_viz import RunSpec
from sam_viz.figures import firing, quality
from sam_viz.attribution import attribute

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
MODELS = ("tiny-llama", "tiny-gpt2", "tiny-qwen2", "tiny-bert", "tiny-mixtral", "minilm", "demo-lm")
POLICIES = ("topk", "threshold", "dense")
DENSITIES = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)
WORDS = "ship storm keeper light night sea harbour rope wave gull tide anchor".split()


def rss_mib() -> float:
    """This process's resident set, from /proc/self/status (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def spec(i: int, models: tuple[str, ...]) -> RunSpec:
    """The i-th analysis: a prompt never seen before (so never a cache hit), models, policies and
    densities in turn (on the slider's steps, as links give them)."""
    words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 9))
    return RunSpec(prompt=f"Note {i}: the {words} came back.", model=models[i % len(models)],
                   policy=POLICIES[(i // len(models)) % len(POLICIES)], density=DENSITIES[i % len(DENSITIES)])


def measure(n: int, at: int, models: tuple[str, ...] = MODELS, attribute_every: int = 10) -> dict:
    """Run n analyses as the pages do; RSS (MiB) after `at` and after n, and the growth between."""
    logging.getLogger("streamlit").setLevel(logging.ERROR)        # bare mode: no script run context
    from pages._shared import cached_analysis, cached_model

    marks, t0 = {}, time.perf_counter()
    for i in range(n):
        s = spec(i, models)
        a = cached_analysis(s)
        firing.firing_heatmap(a, i % a.n_layers).fig.to_json()
        quality.divergence_plot(a).fig.to_json()
        if attribute_every and i % attribute_every == attribute_every - 1:
            attribute(cached_model(s.model), s, method="ixg")
        del a
        if i + 1 in (at, n):
            gc.collect()
            marks[i + 1] = rss_mib()
    return {"analyses": n, "at": at, "rss_mib_at": round(marks[at], 1), "rss_mib_end": round(marks[n], 1),
            "growth": round(marks[n] / marks[at] - 1, 4), "models": list(models), "policies": list(POLICIES),
            "densities": list(DENSITIES), "attribution_every": attribute_every,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--analyses", type=int, default=200)
    ap.add_argument("--at", type=int, default=20)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--attribute-every", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    result = measure(args.analyses, args.at, tuple(args.models.split(",")), args.attribute_every)
    result["cpus"] = os.cpu_count()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
