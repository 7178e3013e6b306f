"""Speed of the current run: dense and sparse forward times of the prompt (warmed up, then rounds
of one dense and one sparse pass side by side, as the kernel benchmark times kernels), the MLP weight
bytes and FLOPs per token (sam_viz.cost), and the floor a batch-1 decoder cannot beat: the time to
read those bytes once at this machine's measured read bandwidth (the physical limit in DESIGN.md's
background, as TEAL and Deja Vu argue it). Also reads benchmark rows saved with
`python -m sam_viz bench kernels|decode --json`.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from sam_viz.models import InputError, LoadedModel
from sam_viz.sparse_ops import sparsified, unavailable_kernels

from .analysis import Analysis, encode_prompt
from .spec import RunSpec

BANDWIDTH_BYTES = 384 * 2**20      # > 2x the L3 of the machines seen here (105-260 MiB)
ROUNDS = 7
MAX_ROUNDS = 50
# Untimed rounds first. Measured in 5 fresh processes x 10 rounds (tiny-llama and minilm, topk with
# the cpu kernel at 0.1, one thread), medians per round: the first sparse pass took 5-13x a settled
# one (tiny-llama 109 vs 8 ms, minilm 219 vs 47 ms: the kernel's weight layout is made, the extension
# loaded), the first dense pass 1.3x; from the second round on the medians stay within the noise.
# Two rounds leave a margin.
WARMUP_ROUNDS = 2
MAX_BENCH_BYTES = 2 * 2**20        # a benchmark JSON file this large is not one of ours
MAX_BENCH_ROWS = 500
BENCH_FIELDS = {                   # the numeric fields each benchmark's rows must carry
    "kernels": ("density", "ms", "dense_ms", "floor_ms", "speedup_vs_dense"),
    "decode": ("density", "dense_tok_s", "sparse_tok_s", "speedup", "ideal_speedup", "share_of_ideal", "f_mlp"),
}


def paired_rounds(dense: Callable[[], float], sparse: Callable[[], float], rounds: int = ROUNDS,
                  warmup: int = WARMUP_ROUNDS) -> list[tuple[float, float]]:
    """(dense, sparse) per timed round, from passes that each return their own time. `warmup`
    rounds run first and are dropped. In a round the two passes run back to back, dense first in
    even rounds and sparse first in odd ones, so that neither always runs after the other."""
    out = []
    for i in range(warmup + rounds):
        if i % 2 == 0:
            d, s = dense(), sparse()
        else:
            s, d = sparse(), dense()
        if i >= warmup:
            out.append((d, s))
    return out


def summarize_rounds(pairs: list[tuple[float, float]]) -> dict:
    """Medians of the dense and sparse times, and the speedup dense / sparse as the median of the
    per-round ratios with their range. Per round, not a ratio of medians: the two passes of a round
    run under the same load, so a slow spell on this machine slows both and cancels in their ratio,
    while a ratio of medians may divide a quiet dense pass by a busy sparse one."""
    ratios = [d / s for d, s in pairs]
    return {"dense_ms": statistics.median(d for d, _ in pairs), "sparse_ms": statistics.median(s for _, s in pairs),
            "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "rounds": len(pairs)}


def time_forward(loaded: LoadedModel, spec: RunSpec, rounds: int = ROUNDS, warmup: int = WARMUP_ROUNDS) -> dict:
    """The prompt's forward pass, dense and sparse (spec's policy, density and kernel), timed in
    `rounds` paired rounds after `warmup` untimed ones (see paired_rounds, summarize_rounds). Only
    the forward is timed; entering `sparsified` (and a first-use calibration) is not."""
    rounds = max(1, min(int(rounds), MAX_ROUNDS))
    enc = encode_prompt(loaded, spec.prompt)
    policy = spec.to_policy()

    def forward() -> float:
        t0 = time.perf_counter()
        loaded.model(**enc)
        return (time.perf_counter() - t0) * 1000

    def sparse() -> float:
        with sparsified(loaded, policy, kernel=spec.kernel):
            return forward()

    with torch.no_grad():
        pairs = paired_rounds(forward, sparse, rounds, max(0, int(warmup)))
    return {**summarize_rounds(pairs), "tokens": int(enc["input_ids"].shape[1]), "warmup": max(0, int(warmup))}


def time_change(timing: dict) -> int:
    """How the sparse forward's measured time moved against dense: +1 slower (the median speedup is
    below 1.00x at two decimals), -1 faster (above), 0 the same."""
    speedup = round(timing["speedup"], 2)
    return 0 if speedup == 1 else (1 if speedup < 1 else -1)


def speedup_text(timing: dict) -> str:
    """'0.95x (0.88-1.02 over 7 rounds)': the median per-round speedup and its range."""
    return (f"{timing['speedup']:.2f}x ({timing['speedup_min']:.2f}-{timing['speedup_max']:.2f} "
            f"over {timing['rounds']} rounds)")


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


GPU_RESULTS = Path(__file__).with_name("data") / "triton_h200.json"      # from bench/gpu_check.sh on an H200


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


def dense_vs_floor(rows: list[dict]) -> list[dict]:
    """Per shape and dtype of kernel rows that carry `dense_floor_ms` (the time to read every row
    once, in the kernel's access pattern): torch's dense MLP time over it. Above 1, torch's dense
    MLP runs slower than reading its weights once at full bandwidth, so a sparse kernel that reaches
    its own floor beats dense by more than 1/density."""
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        floor = r.get("dense_floor_ms")
        if isinstance(floor, (int, float)) and not isinstance(floor, bool) and math.isfinite(floor) and floor > 0:
            ratios.setdefault((str(r["shape"]), str(r["dtype"])), []).append(r["dense_ms"] / floor)
    return [{"shape": s, "dtype": d, "dense_over_floor": statistics.median(v)} for (s, d), v in ratios.items()]


def benchmarks_unavailable() -> str | None:
    """Why the kernel and decode benchmarks (which time the cpu kernel) cannot run here; None if they can."""
    return unavailable_kernels().get("cpu")


def beyond_ideal_note(rows: list[dict]) -> str:
    """Why a measured kernel speedup can pass 1/density (and a share of ideal pass 100%), with the
    dense baseline's distance to its own floor where the rows carry it (markdown, one paragraph)."""
    over = dense_vs_floor(rows)
    measured = ("Here torch's dense MLP took " + ", ".join(
        f"{r['dense_over_floor']:.2f}x its floor ({r['shape']} {r['dtype']})" for r in over) + "." if over else
        "These results carry no `dense_floor_ms`, so how far the dense baseline is from its floor is not known.")
    return ("**Why a speedup can pass 1/density.** The ideal 1/density assumes that dense and sparse read "
            "weights equally fast. The dense baseline is torch's `F.linear`, which reads bf16 weights at about "
            "half the bandwidth that our kernel and the floor loop reach, so it is slower than its own floor "
            "(`dense_floor_ms`: every row read once, as the floor loop reads them). A sparse kernel near its "
            "floor then beats dense by more than 1/density: a share of the ideal above 100% means that the dense "
            "baseline is slower than its floor, not that the kernel beat the bandwidth. " + measured)
