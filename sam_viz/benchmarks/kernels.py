"""Sparse MLP kernels at the Llama-7B shape (4096, 11008) and the TinyLlama shape (2048, 5632),
fp32 and bf16 weights, densities 0.05 / 0.1 / 0.25 / 0.5, batch 1: medians of the dense F.linear
MLP, the `cpu` backend, and the floor: a compiled loop that reads the same selected rows once, in the
kernel's access pattern (gate, up and down rows side by side, prefetched), doing nothing else. Also
the time to read *all* rows that way (`dense_floor_ms`, what a dense MLP at full bandwidth would
take), since torch's bf16 dense GEMV runs well below bandwidth and flatters a bf16 speedup.
Weight copies are rotated so that each call reads from memory, not from a warm cache.

    python -m sam_viz bench kernels [--quick] [--json]     (or python -m bench.kernels)
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from sam_viz.models import MLPWeights
from sam_viz.sparse_ops.cpu import extension, prepare, sparse_mlp_shared

SHAPES = {"llama-7b": (4096, 11008), "tinyllama": (2048, 5632)}
DENSITIES = (0.05, 0.1, 0.25, 0.5)
ROTATE_BYTES = 600 * 2**20          # > 2x the L3 of the machines seen here (105-260 MiB)


def _copies(d: int, d_ff: int, dtype: torch.dtype, seed: int = 0) -> list[tuple[MLPWeights, object]]:
    per_copy = 3 * d * d_ff * (4 if dtype == torch.float32 else 2)
    n = max(3, -(-ROTATE_BYTES // per_copy))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = MLPWeights(gate=(torch.randn(d_ff, d, generator=gen) / d ** 0.5).to(dtype),
                       up=(torch.randn(d_ff, d, generator=gen) / d ** 0.5).to(dtype),
                       down_t=(torch.randn(d_ff, d, generator=gen) / d_ff ** 0.5).to(dtype), act=torch.nn.SiLU())
        out.append((w, prepare(w, dtype)))
    return out


def _interleaved_medians(fns, n_calls: int, swap: tuple[int, int] | None = None) -> list[float]:
    """Median ms of each fn, timed call by call side by side (fn_a, fn_b, ..., fn_a, ...), so that a
    noisy neighbour slows all of them alike and the ratios stay honest. Each call gets the next
    weight copy (fn(c) uses copies[c % n]): no call finds rows that the call before it just read.
    `swap` (i, j): every other round runs fns[i] and fns[j] in each other's place, so each of the two
    follows the same calls equally often (what a call leaves behind affects the one after it)."""
    times = [[] for _ in fns]
    call = 0
    for i in range(n_calls + 2):
        order = list(range(len(fns)))
        if swap is not None and i % 2:
            order[swap[0]], order[swap[1]] = order[swap[1]], order[swap[0]]
        for f in order:
            t0 = time.perf_counter()
            fns[f](call)
            call += 1
            if i >= 2:                                                   # two warm-up rounds
                times[f].append((time.perf_counter() - t0) * 1000)
    return [statistics.median(t) for t in times]


def _rows_for(name: str, d: int, d_ff: int, dt: str, densities, calls: int, ext) -> list[dict]:
    """One shape and dtype; its weight copies are freed when this returns."""
    dtype = torch.float32 if dt == "fp32" else torch.bfloat16
    copies = _copies(d, d_ff, dtype)
    gen = torch.Generator().manual_seed(d + d_ff)       # not the global generator: sessions share that one
    x = torch.randn(1, d, generator=gen)
    xd = x.to(dtype)
    down = [w.down_t.t().contiguous() for w, _ in copies]                    # F.linear's [d, d_ff]

    def dense(i):
        w = copies[i % len(copies)][0]
        F.linear(F.silu(F.linear(xd, w.gate)) * F.linear(xd, w.up), down[i % len(copies)])

    all_rows = torch.arange(d_ff)

    def dense_floor(i):
        p = copies[i % len(copies)][1]
        ext.read_rows(p.gu, p.down, all_rows)

    # dense and its floor once per shape and dtype, side by side
    dense_ms, dense_floor_ms = _interleaved_medians([dense, dense_floor], calls, swap=(0, 1))
    rows = []
    for density in densities:
        k = round(density * d_ff)
        sets = [torch.sort(torch.randperm(d_ff, generator=gen)[:k]).values for _ in range(7)]

        out = (torch.empty(1, d), torch.empty(1, k))                           # reused, as a decode loop would

        def sparse(i):
            sparse_mlp_shared(x, sets[i % 7], copies[i % len(copies)][1], out=out)

        def floor(i):
            p = copies[i % len(copies)][1]
            ext.read_rows(p.gu, p.down, sets[i % 7])

        # cpu and floor in alternation, each one first every other round. Not mixed with the dense
        # calls: right after a full read of the weights (100-200 MiB streamed) the next call at small k
        # is slower, and more so for the kernel than for the floor (standalone harness, TinyLlama
        # bf16 at 0.05-0.1: cpu/floor 1.08-1.11 alternating, 1.17-1.22 each right after a full read).
        cpu_ms, floor_ms = _interleaved_medians([sparse, floor], 2 * calls, swap=(0, 1))
        gb = k * 3 * d * (4 if dtype == torch.float32 else 2) / 1e9
        rows.append({"backend": "cpu", "isa": ext.isa(), "shape": name, "dtype": dt, "d": d, "d_ff": d_ff,
                     "density": density, "ms": cpu_ms, "dense_ms": dense_ms, "floor_ms": floor_ms,
                     "dense_floor_ms": dense_floor_ms, "vs_floor": cpu_ms / floor_ms,
                     "speedup_vs_dense": dense_ms / cpu_ms, "speedup_vs_dense_floor": dense_floor_ms / cpu_ms,
                     "floor_gb_s": gb / floor_ms * 1e3, "cpu_gb_s": gb / cpu_ms * 1e3})
    return rows


QUICK = dict(shapes={"tinyllama": SHAPES["tinyllama"]}, calls=15)
FULL = dict(calls=40)


def run(shapes=SHAPES, dtypes=("fp32", "bf16"), densities=DENSITIES, calls: int = 30,
        progress=None) -> list[dict]:
    """Rows per shape, dtype and density; progress(frac, text), if given, before each shape and dtype."""
    ext = extension()
    parts = [(name, d, d_ff, dt) for name, (d, d_ff) in shapes.items() for dt in dtypes]
    rows = []
    for i, (name, d, d_ff, dt) in enumerate(parts):
        if progress is not None:
            progress(i / len(parts), f"{name} {dt} ({i + 1} of {len(parts)})")
        rows += _rows_for(name, d, d_ff, dt, densities, calls, ext)
    if progress is not None:
        progress(1.0, "done")
    return rows


def report(rows: list[dict], calls: int) -> list[str]:
    """The rows as the table `bench kernels` prints, with a line saying how they were timed."""
    lines = [f"threads {torch.get_num_threads()}; cpu kernel path {rows[0]['isa']}; medians of {calls} calls (dense, "
             f"dense floor) and {2 * calls} (cpu, floor), interleaved; weights rotated past L3",
             "shape      dtype  density  dense_ms  dense_floor_ms  cpu_ms  floor_ms  cpu/floor  floor_GB/s  "
             "x_dense  x_dense_floor"]
    for r in rows:
        lines.append(f"{r['shape']:10s} {r['dtype']:5s}  {r['density']:7.2f}  {r['dense_ms']:8.2f}  "
                     f"{r['dense_floor_ms']:14.2f}  {r['ms']:6.2f}  {r['floor_ms']:8.2f}  {r['vs_floor']:9.2f}  "
                     f"{r['floor_gb_s']:10.1f}  {r['speedup_vs_dense']:7.2f}  {r['speedup_vs_dense_floor']:13.2f}")
    return lines
