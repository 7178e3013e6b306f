"""Speed of the current run: dense and sparse forward times of the prompt (interleaved medians, as
bench/kernels.py times kernels), the MLP weight bytes and FLOPs per token (sam_viz.cost), and the
floor a batch-1 decoder cannot beat: the time to read those bytes once at this machine's measured
read bandwidth (the physical limit in DESIGN.md's background, as TEAL and Deja Vu argue it).
Also reads benchmark rows saved with `python -m sam_viz bench kernels|decode --json`.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
import time
from pathlib import Path

import torch

from models import InputError, LoadedModel
from sparse_ops import sparsified

from .analysis import Analysis, encode_prompt
from .spec import RunSpec

BANDWIDTH_BYTES = 384 * 2**20      # > 2x the L3 of the machines seen here (105-260 MiB)
MAX_REPEATS = 50
MAX_BENCH_BYTES = 2 * 2**20        # a benchmark JSON file this large is not one of ours
MAX_BENCH_ROWS = 500
BENCH_FIELDS = {                   # the numeric fields each benchmark's rows must carry
    "kernels": ("density", "ms", "dense_ms", "floor_ms", "speedup_vs_dense"),
    "decode": ("density", "dense_tok_s", "sparse_tok_s", "speedup", "ideal_speedup", "share_of_ideal", "f_mlp"),
}


def time_forward(loaded: LoadedModel, spec: RunSpec, repeats: int = 5) -> dict:
    """Medians of `repeats` forward passes of the prompt, dense and sparse (spec's policy, density
    and kernel), timed one after the other so that a noisy neighbour slows both alike. Only the
    forward is timed; entering `sparsified` (and a first-use calibration) is not."""
    repeats = max(1, min(int(repeats), MAX_REPEATS))
    enc = encode_prompt(loaded, spec.prompt)
    policy = spec.to_policy()
    dense, sparse = [], []
    with torch.no_grad():
        for i in range(repeats + 1):                                   # round 0 warms up (kernel layouts)
            t0 = time.perf_counter()
            loaded.model(**enc)
            t1 = time.perf_counter()
            with sparsified(loaded, policy, kernel=spec.kernel):
                t2 = time.perf_counter()
                loaded.model(**enc)
                t3 = time.perf_counter()
            if i:
                dense.append((t1 - t0) * 1000)
                sparse.append((t3 - t2) * 1000)
    dense_ms, sparse_ms = statistics.median(dense), statistics.median(sparse)
    return {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
            "tokens": int(enc["input_ids"].shape[1]), "repeats": repeats}


@functools.cache
def read_bandwidth_gb_s(nbytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> float:
    """This machine's read bandwidth (GB/s): the median time to sum an fp32 tensor of nbytes, larger
    than the last-level cache, with torch's threads. Measured once per process."""
    x = torch.ones(nbytes // 4)
    x.sum()                                                            # first touch: page faults
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times) / 1e9


def cost_summary(analysis: Analysis, bandwidth_gb_s: float) -> dict | None:
    """Per token, as a batch-1 decoder pays it: MLP weight bytes and FLOPs dense vs sparse (the
    analysis' cost, predictor included) and the floors = bytes / bandwidth. None without a cost."""
    c = analysis.cost
    if not c or not bandwidth_gb_s > 0:
        return None
    floor = lambda nbytes: nbytes / (bandwidth_gb_s * 1e9) * 1000      # noqa: E731 - ms
    return {"dense_bytes": c["dense_bytes"], "sparse_bytes": c["sparse_bytes"],
            "dense_flops": c["dense_flops"], "sparse_flops": c["sparse_flops"], "ratio": c["ratio"],
            "bandwidth_gb_s": bandwidth_gb_s, "dense_floor_ms": floor(c["dense_bytes"]),
            "sparse_floor_ms": floor(c["sparse_bytes"]),
            "floor_speedup": c["dense_bytes"] / c["sparse_bytes"] if c["sparse_bytes"] else math.inf}


def parse_bench_json(data: bytes | str) -> tuple[str, list[dict]]:
    """(which benchmark, rows) from the output of `bench kernels|decode --json`; InputError with one
    sentence for anything else (the file comes from a user)."""
    if len(data) > MAX_BENCH_BYTES:
        raise InputError(f"the file is {len(data):,} bytes; benchmark results are under {MAX_BENCH_BYTES:,}")
    try:
        rows = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise InputError("the file is not JSON; save the output of `python -m sam_viz bench ... --json`") from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise InputError("expected a non-empty JSON list of result rows, as `bench ... --json` prints")
    if len(rows) > MAX_BENCH_ROWS:
        raise InputError(f"the file has {len(rows):,} rows; the limit is {MAX_BENCH_ROWS}")
    kind = "decode" if "sparse_tok_s" in rows[0] else "kernels"
    for i, r in enumerate(rows):
        for f in BENCH_FIELDS[kind]:
            v = r.get(f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"row {i} of the {kind} results has no valid number '{f}'")
        if not 0 < r["density"] <= 1:
            raise InputError(f"row {i} has density {r['density']}; densities are in (0, 1]")
    if kind == "kernels":                                              # labels, bounded
        rows = [{**r, "shape": str(r.get("shape", "?"))[:40], "dtype": str(r.get("dtype", "?"))[:10]} for r in rows]
    return kind, rows


GPU_RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "triton_h200.json"


def saved_gpu_rows(path=GPU_RESULTS) -> tuple[dict, list[dict]]:
    """The `triton` kernel's results saved from a lent GPU (bench/gpu_kernels.py), as kernel rows:
    ms and dense_ms are the CUDA-graph replays (eager batch-1 calls are launch-bound), floor_ms is
    the selected bytes at the measured device bandwidth. ({}, []) when there is no such file."""
    try:
        data = json.loads(path.read_text()) if path.stat().st_size <= MAX_BENCH_BYTES else {}
    except (OSError, ValueError):
        return {}, []
    out = []
    for r in data.get("rows", [])[:MAX_BENCH_ROWS]:
        try:
            ms, dense_ms = float(r["graph_ms"]), float(r["dense_graph_ms"])
            row = {"backend": "triton", "shape": str(r["shape"])[:40], "dtype": str(r["dtype"])[:10],
                   "density": float(r["density"]), "ms": ms, "dense_ms": dense_ms, "floor_ms": float(r["floor_ms"]),
                   "speedup_vs_dense": dense_ms / ms}
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            continue
        if all(math.isfinite(v) and v > 0 for v in (ms, dense_ms, row["floor_ms"])) and 0 < row["density"] <= 1:
            out.append(row)
    info = data.get("info", {}) if isinstance(data.get("info"), dict) else {}
    return {k: str(v)[:60] for k, v in info.items()}, out
