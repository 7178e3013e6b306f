"""The input kernel (a projection whose input is sparse: TEAL, Q-Sparse) at TinyLlama's projection
shapes, W [d_out, d_in] = 2048 x 2048 (q, o) and 5632 x 2048 (gate, up), fp32 and bf16, densities
0.25 / 0.4 / 0.5 / 0.65, batch 1: medians of the dense F.linear, the `cpu` backend, and its floor: a
compiled loop that reads the same selected rows of W^T once, in the kernel's access pattern (4 rows
side by side, prefetched), doing nothing else; and that loop over all rows (`dense_floor_ms`).
Weight copies are rotated past L3, and timed side by side, as in sam_viz.benchmarks.kernels.

    python -m sam_viz bench kernels --input [--quick] [--json]     (or python -m bench.kernels --input)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sam_viz.sparse_ops.cpu import extension, prepare_proj
from sam_viz.sparse_ops.proj import ProjWeights

from .kernels import ROTATE_BYTES, _interleaved_medians

SHAPES = {"q/o 2048x2048": (2048, 2048), "gate/up 5632x2048": (5632, 2048)}     # (d_out, d_in)
DENSITIES = (0.25, 0.4, 0.5, 0.65)
QUICK = dict(calls=10)
FULL = dict(calls=30)


def _copies(d_out: int, d_in: int, dtype: torch.dtype, gen: torch.Generator) -> list[tuple[torch.Tensor, object]]:
    """(W as the model holds it, the kernel's rows of W^T) per copy; enough copies to pass L3."""
    per_copy = 2 * d_out * d_in * (4 if dtype == torch.float32 else 2)       # W and its W^T layout
    out = []
    for _ in range(max(3, -(-ROTATE_BYTES // per_copy))):
        w = (torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).to(dtype)
        out.append((w, prepare_proj(ProjWeights(w), dtype)))
    return out


def _rows_for(name: str, d_out: int, d_in: int, dt: str, densities, calls: int, ext) -> list[dict]:
    dtype = torch.float32 if dt == "fp32" else torch.bfloat16
    gen = torch.Generator().manual_seed(d_out + d_in)                    # not the global generator
    copies = _copies(d_out, d_in, dtype, gen)
    x = torch.randn(1, d_in, generator=gen)
    xd = x.to(dtype)
    all_rows = torch.arange(d_in)
    nbytes = d_out * (4 if dtype == torch.float32 else 2)                # one row of W^T

    def dense(i):
        F.linear(xd, copies[i % len(copies)][0])

    def dense_floor(i):
        ext.read_input_rows(copies[i % len(copies)][1].wt, all_rows)

    dense_ms, dense_floor_ms = _interleaved_medians([dense, dense_floor], calls, swap=(0, 1))
    rows = []
    for density in densities:
        k = round(density * d_in)
        sets = [torch.sort(torch.randperm(d_in, generator=gen)[:k]).values for _ in range(7)]
        idx = [s.view(1, k) for s in sets]

        def sparse(i):
            ext.sparse_input(x, copies[i % len(copies)][1].wt, None, idx[i % 7])

        def floor(i):
            ext.read_input_rows(copies[i % len(copies)][1].wt, sets[i % 7])

        cpu_ms, floor_ms = _interleaved_medians([sparse, floor], 2 * calls, swap=(0, 1))
        gb = k * nbytes / 1e9
        rows.append({"backend": "cpu-input", "isa": ext.isa(), "shape": name, "dtype": dt, "d_in": d_in,
                     "d_out": d_out, "density": density, "ms": cpu_ms, "dense_ms": dense_ms, "floor_ms": floor_ms,
                     "dense_floor_ms": dense_floor_ms, "vs_floor": cpu_ms / floor_ms,
                     "speedup_vs_dense": dense_ms / cpu_ms, "speedup_vs_dense_floor": dense_floor_ms / cpu_ms,
                     "floor_gb_s": gb / floor_ms * 1e3, "cpu_gb_s": gb / cpu_ms * 1e3})
    return rows


def run(shapes=SHAPES, dtypes=("fp32", "bf16"), densities=DENSITIES, calls: int = 30) -> list[dict]:
    """Rows per shape, dtype and density."""
    ext = extension()
    return [row for name, (d_out, d_in) in shapes.items() for dt in dtypes
            for row in _rows_for(name, d_out, d_in, dt, densities, calls, ext)]


def report(rows: list[dict], calls: int) -> list[str]:
    """The rows as `bench kernels --input` prints them, with a line saying how they were timed."""
    lines = [f"input kernel (sparse input x, y = W[:, S] x_S); threads {torch.get_num_threads()}; cpu kernel path "
             f"{rows[0]['isa']}; medians of {calls} calls (dense, dense floor) and {2 * calls} (cpu, floor), "
             "interleaved; weights rotated past L3",
             "shape               dtype  density  dense_ms  dense_floor_ms  cpu_ms  floor_ms  cpu/floor  "
             "floor_GB/s  x_dense"]
    for r in rows:
        lines.append(f"{r['shape']:19s} {r['dtype']:5s}  {r['density']:7.2f}  {r['dense_ms']:8.3f}  "
                     f"{r['dense_floor_ms']:14.3f}  {r['ms']:6.3f}  {r['floor_ms']:8.3f}  {r['vs_floor']:9.2f}  "
                     f"{r['floor_gb_s']:10.1f}  {r['speedup_vs_dense']:7.2f}")
    return lines
