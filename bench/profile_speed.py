"""Throughput of a corpus profile's map step against a plain dense forward over the same tokens
(issue 14's goal: the map at >= 50% of the forward's tokens/s), side by side in one process.

For each case, on the same shards and thread count, each repeat runs in turn: the plain forward
(`base_model(input_ids)` in the mapper's batches, no recorder), the map step of a baseline revision
(its sam_viz/profile/accumulate.py read from git, swapped into the mapper) and the map step of the
working tree (ShardMapper + run_local's merge). Medians of wall and process CPU seconds are kept;
CPU seconds are steadier on a shared machine. Also the state size (Partial) for each case's model
and for a 7B shape (32 layers x 11,008 units), now and at the baseline.

    python -m bench.profile_speed [--baseline 8cf234f] [--repeats 3] [--threads N] [--quick] [--out PATH]

Writes bench/results/profile_speed.json (default).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import transformers

from sam_viz.profile import mapper as mapper_mod
from sam_viz.profile.corpus import read_corpus, tokenize
from sam_viz.profile.engine import run_local
from sam_viz.profile.mapper import BATCH, ProfileSettings, ShardMapper
from sam_viz.profile.stats import Layout, Partial

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "profile_speed.json"
CASES = (("minilm", "builtin:calibration", None), ("demo-lm", "models/demo/heldout.txt", 20_000))
SHAPE_7B = (32, 11_008)


def baseline_modules(rev: str):
    """(accumulate, stats) of sam_viz/profile as they were at git revision `rev`, loaded as the
    package sam_viz.profile._baseline (so that accumulate's `from .stats import` finds its own)."""
    package = "sam_viz.profile._baseline"
    sys.modules[package] = types.ModuleType(package)
    loaded = []
    for name in ("stats", "accumulate"):
        source = subprocess.run(["git", "show", f"{rev}:sam_viz/profile/{name}.py"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        module = types.ModuleType(f"{package}.{name}")
        module.__package__ = package
        sys.modules[module.__name__] = module
        exec(compile(source, f"{rev}:sam_viz/profile/{name}.py", "exec"), module.__dict__)
        loaded.append(module)
    return loaded[1], loaded[0]


def state_bytes(partial_cls, n_layers: int, units: int) -> int:
    """Partial size for a layout, from two small allocations (the size is linear in the layers)."""
    one = partial_cls.empty(Layout(1, units)).nbytes()
    return one + (n_layers - 1) * (partial_cls.empty(Layout(2, units)).nbytes() - one)


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_case(spec: str, source: str, max_tokens: int | None, repeats: int, baseline, old_stats) -> dict:
    settings = ProfileSettings(policy="topk", density=0.1, context=128, max_tokens=max_tokens)
    mapper = ShardMapper(spec, settings)
    loaded = mapper.loaded
    stream = tokenize(loaded, read_corpus(source), settings.context, settings.max_tokens)
    shards = list(stream.shards())
    tokens = sum(s.tokens for s in shards)

    def dense(over=shards):
        with torch.no_grad():
            for shard in over:
                for b in range(0, shard.ids.shape[0], BATCH):
                    loaded.model.base_model(input_ids=torch.from_numpy(shard.ids[b:b + BATCH]).to(mapper.device))

    def map_with(stats_cls):
        def go(over=shards):
            current = mapper_mod.ShardStats
            mapper_mod.ShardStats = stats_cls
            try:
                run_local(mapper, over)
            finally:
                mapper_mod.ShardStats = current
        return go

    runs = {"dense": dense, "map_after": map_with(mapper_mod.ShardStats)}
    if baseline is not None:
        runs["map_before"] = map_with(baseline.ShardStats)
    for fn in runs.values():                                  # warm-up on one shard (first-call costs)
        fn(shards[:1])
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(_timed(fn))
    out = {"model": spec, "corpus": source, "tokens": tokens, "shards": len(shards), "context": settings.context,
           "policy": settings.policy, "density": settings.density, "d_ff": loaded.d_ff, "n_layers": loaded.n_layers}
    for name, ts in times.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        out[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "tokens_per_s": round(tokens / wall, 1),
                     "tokens_per_cpu_s": round(tokens / cpu, 1)}
    for name in ("map_before", "map_after"):
        if name in out:
            out[f"ratio_{name[4:]}"] = {"wall": round(out["dense"]["wall_s"] / out[name]["wall_s"], 3),
                                        "cpu": round(out["dense"]["cpu_s"] / out[name]["cpu_s"], 3)}
    out["state_bytes"] = {"after": Partial.empty(mapper.layout).nbytes()}
    if old_stats is not None:
        out["state_bytes"]["before"] = old_stats.Partial.empty(mapper.layout).nbytes()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_speed")
    parser.add_argument("--baseline", default=None, help="git revision whose accumulate.py is 'before'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="4,096 tokens per case (a smoke run)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = old_stats = None
    if args.baseline:
        baseline, old_stats = baseline_modules(args.baseline)
    load = os.getloadavg()[0]
    cases = [run_case(spec, src, 4096 if args.quick else n, args.repeats, baseline, old_stats)
             for spec, src, n in CASES]
    result = {"baseline": args.baseline, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)], "repeats": args.repeats,
              "cases": cases, "state_bytes_7b": {"after": state_bytes(Partial, *SHAPE_7B)}}
    if old_stats is not None:
        result["state_bytes_7b"]["before"] = state_bytes(old_stats.Partial, *SHAPE_7B)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
