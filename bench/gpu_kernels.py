"""The `triton` backend on a GPU (the TEAL / Deja Vu gather-GEMV setting): parity with `reference`
on random shapes, then batch-1 timings at the Llama-7B (4096, 11008) and TinyLlama (2048, 5632)
shapes, fp32 / bf16 / fp16 weights, densities 0.05 / 0.1 / 0.25 / 0.5, against the dense F.linear
MLP in the same dtype and the floor: the selected rows' bytes at the bandwidth measured here.

    python -m bench.gpu_kernels [OUT.json]      (default $OUT/gpu_kernels.json, else ./gpu_kernels.json)

Times are medians of CUDA-event intervals, each call reading cold weights: 4 weight copies rotated
and L2 flushed before every call. `ms` is an eager call (launch overhead included, as a Python
decode loop pays it); `graph_ms` replays the same call from a CUDA graph (GPU time only).
Exits 1 when a parity check fails or there is no CUDA device; a row that errors is reported and
skipped. Imports only torch, triton and this repository.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from sam_viz.models import MLPWeights
from sam_viz.sparse_ops.kernels import reference
from sam_viz.sparse_ops.triton_kernel import triton_kernel

SHAPES = {"llama-7b": (4096, 11008), "tinyllama": (2048, 5632)}
DENSITIES = (0.05, 0.1, 0.25, 0.5)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COPIES, REPS, WARMUP = 4, 50, 5
DEADLINE_S = 150                      # rows not started by then are skipped (the whole run: < 3 min)
ACTS = {"silu": torch.nn.SiLU(), "gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU(approximate="tanh"),
        "relu": torch.nn.ReLU()}
# (N, d, d_ff, d_out, k, glu, bias, act, dtype): widths off the block sizes, k = 1 and k = d_ff
PARITY = [(1, 4096, 11008, 4096, 1100, True, False, "silu", "bf16"),
          (3, 1000, 3001, 777, 1, True, True, "gelu", "fp32"),
          (2, 130, 257, 300, 257, False, True, "gelu_tanh", "fp32"),
          (4, 2048, 5632, 2048, 2816, True, False, "silu", "fp16"),
          (5, 771, 2000, 771, 333, False, False, "relu", "bf16"),
          (16, 512, 1376, 512, 138, True, True, "silu", "fp32")]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))


def _weights(d, d_ff, d_out, glu, bias, act, dtype, gen) -> MLPWeights:
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device="cuda") * scale)  # noqa: E731
    return MLPWeights(gate=r(d_ff, d, scale=d ** -0.5).to(dtype), up=r(d_ff, d, scale=d ** -0.5).to(dtype) if glu else None,
                      down_t=r(d_ff, d_out, scale=d_ff ** -0.5).to(dtype), act=ACTS[act],
                      b_gate=r(d_ff) if bias else None, b_up=r(d_ff) if bias and glu else None,
                      b_down=r(d_out) if bias else None)


def _in_fp32(w: MLPWeights) -> MLPWeights:
    """The same rounded weights, for the reference to compute in fp32."""
    f = lambda t: None if t is None else t.float()  # noqa: E731
    return MLPWeights(gate=f(w.gate), up=f(w.up), down_t=f(w.down_t), act=w.act, b_gate=w.b_gate,
                      b_up=w.b_up, b_down=w.b_down)


def parity() -> list[dict]:
    """Random shapes: unsorted sets, -1 padding in token 0; rel error of y and h against reference."""
    out, gen = [], torch.Generator(device="cuda").manual_seed(0)
    for n, d, d_ff, d_out, k, glu, bias, act, dt in PARITY:
        row = {"n": n, "d": d, "d_ff": d_ff, "d_out": d_out, "k": k, "glu": glu, "bias": bias, "act": act, "dtype": dt}
        try:
            w = _weights(d, d_ff, d_out, glu, bias, act, DTYPES[dt], gen)
            x = torch.randn(n, d, device="cuda", generator=gen)
            idx = torch.stack([torch.randperm(d_ff, device="cuda", generator=gen)[:k] for _ in range(n)])
            if k > 1:
                idx[0, ::3] = -1
            y, h = triton_kernel(x, idx, w)
            y_ref, h_ref = reference(x, idx, _in_fp32(w))
            torch.cuda.synchronize()
            row["rel_err"] = max(_rel(y, y_ref), _rel(h, h_ref))
            row["ok"] = row["rel_err"] <= (1e-5 if dt == "fp32" else 1e-2)
        except Exception as exc:  # noqa: BLE001 - report and go on
            row["ok"], row["error"] = False, f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(f"parity {dt:4s} n={n} d={d} d_ff={d_ff} d_out={d_out} k={k} glu={glu} bias={bias} {act:9s} "
              f"rel_err={row.get('rel_err', float('nan')):.2e} {'ok' if row['ok'] else 'FAIL'}", flush=True)
        out.append(row)
    return out


class Timer:
    """Median ms of CUDA-event intervals around fn(i), with L2 flushed (a 256 MiB memset) before each."""

    def __init__(self):
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def __call__(self, fn, reps: int = REPS) -> float:
        for i in range(WARMUP):
            fn(i)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush.zero_()
            starts[i].record()
            fn(i)
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def bandwidth(timer: Timer) -> tuple[float, str]:
    """Peak DRAM bandwidth in bytes/ms: the better of a 1 GiB device-to-device copy and a sum over 2 GiB."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / timer(lambda i: dst.copy_(src), reps=10)
    big = torch.ones(2**29, dtype=torch.float32, device="cuda")
    read = big.numel() * 4 / timer(lambda i: big.sum(), reps=10)
    return (copy, "device-to-device copy (read + write)") if copy >= read else (read, "torch.sum (read)")


def _graphed(fns) -> list:
    """Each fn() captured once in a CUDA graph; replay(i) runs fns[i % len]."""
    graphs = []
    for fn in fns:
        fn()                                            # compile / warm up outside the capture
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs.append(g)
    return lambda i: graphs[i % len(graphs)].replay()


def _try(label: str, fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - report the row and go on
        print(f"  {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
        return None


def rows_for(name: str, d: int, d_ff: int, dt: str, timer: Timer, bw: float, t0: float) -> list[dict]:
    """One shape and dtype: the dense MLP once, then the triton kernel at each density."""
    dtype, es = DTYPES[dt], torch.finfo(DTYPES[dt]).bits // 8
    gen = torch.Generator(device="cuda").manual_seed(1)
    ws = [_weights(d, d_ff, d, True, False, "silu", dtype, gen) for _ in range(COPIES)]
    downs = [w.down_t.t().contiguous() for w in ws]                      # F.linear's [d, d_ff]
    x = torch.randn(1, d, device="cuda", generator=gen)
    xd = x.to(dtype)
    dense = [lambda w=w, down=down: F.linear(F.silu(F.linear(xd, w.gate)) * F.linear(xd, w.up), down)
             for w, down in zip(ws, downs)]
    dense_ms = _try("dense", lambda: timer(lambda i: dense[i % COPIES]()))
    dense_graph_ms = _try("dense graph", lambda: timer(_graphed(dense)))
    rows = []
    for density in DENSITIES:
        row = {"backend": "triton", "shape": name, "dtype": dt, "d": d, "d_ff": d_ff, "density": density,
               "dense_ms": dense_ms, "dense_graph_ms": dense_graph_ms}
        rows.append(row)
        if time.monotonic() - t0 > DEADLINE_S:
            row["error"] = "skipped: past the deadline"
            continue
        k = round(density * d_ff)
        sets = [torch.randperm(d_ff, device="cuda", generator=gen)[:k][None] for _ in range(COPIES)]  # [1, k]
        calls = [lambda w=w, idx=idx: triton_kernel(x, idx, w) for w, idx in zip(ws, sets)]
        try:
            y, _ = calls[0]()
            row["rel_err"] = _rel(y, reference(x, sets[0], _in_fp32(ws[0]))[0])
            row["ok"] = row["rel_err"] <= (1e-5 if dt == "fp32" else 1e-2)
        except Exception as exc:  # noqa: BLE001
            row["ok"], row["error"] = False, f"{type(exc).__name__}: {exc}"
            print(f"  {name} {dt} {density}: {row['error']}", flush=True)
            continue
        row["ms"] = _try("triton", lambda: timer(lambda i: calls[i % COPIES]()))
        row["graph_ms"] = _try("triton graph", lambda: timer(_graphed(calls)))
        row["floor_ms"] = k * 3 * d * es / bw                           # gate, up and down rows, read once
        row["dense_floor_ms"] = d_ff * 3 * d * es / bw
        for key, num, den in [("speedup_vs_dense", "dense_ms", "ms"), ("graph_speedup_vs_dense", "dense_graph_ms", "graph_ms"),
                              ("graph_vs_floor", "graph_ms", "floor_ms")]:
            if row.get(num) and row.get(den):
                row[key] = row[num] / row[den]
        print(f"{name:9s} {dt:4s} {density:5.2f}  ms={row['ms'] or float('nan'):.4f} graph_ms="
              f"{row['graph_ms'] or float('nan'):.4f}  dense_ms={dense_ms or float('nan'):.4f} dense_graph_ms="
              f"{dense_graph_ms or float('nan'):.4f}  floor_ms={row['floor_ms']:.4f}  rel_err={row['rel_err']:.1e}",
              flush=True)
    del ws, downs
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str]) -> int:
    t0 = time.monotonic()
    out_path = argv[0] if argv else os.path.join(os.environ.get("OUT", "."), "gpu_kernels.json")
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 1
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False                       # the reference in true fp32
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(info, flush=True)
    result = {"info": info, "parity": parity(), "rows": []}
    ok = all(r["ok"] for r in result["parity"])
    if ok:
        timer = Timer()
        bw, how = bandwidth(timer)
        info.update(bandwidth_GBps=bw / 1e6, bandwidth_from=how)
        print(f"bandwidth {bw / 1e6:.0f} GB/s ({how})", flush=True)
        for name, (d, d_ff) in SHAPES.items():
            for dt in DTYPES:
                rows = _try(f"{name} {dt}", lambda: rows_for(name, d, d_ff, dt, timer, bw, t0)) or []
                result["rows"] += rows
        ok = all(r.get("ok", True) for r in result["rows"])
    info["seconds"] = time.monotonic() - t0
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out_path} in {info['seconds']:.0f} s; parity {'ok' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
