"""Corpus profile benchmark (issue 14; not a timed test): throughput of `profile --engine local`
against a plain dense forward over the same tokens (goal: at least 50% of it), peak memory at 10k
and 100k tokens (goal: no growth with the corpus beyond the stored results), and the Ray engine's
overhead at 50k tokens on this machine.

    python -m bench.profile [--model minilm] [--corpus models/demo/heldout.txt]

Every profile runs as `python -m sam_viz profile ... --json` in a fresh subprocess with its own
empty SAM_VIZ_PROFILE_DIR: tokens/s is the manifest's tokens / wall_s (the map and merge and the
tables written; not the model load or tokenizing), peak memory is the subprocess' ru_maxrss
(os.wait4; for Ray, the driver's only), and `process_s` is the whole command's wall time (start-up,
model load, tokenizing, a local Ray cluster's start and stop). The dense reference runs here:
base_model on the same windows (context 128, batches of 16, no_grad, the same torch threads).
Writes bench/results/profile.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from sam_viz.models import load_model
from sam_viz.profile.corpus import read_corpus, tokenize

CONTEXT = 128
BATCH = 16
OUT = Path(__file__).parent / "results" / "profile.json"


def run_profile(model: str, source: str, max_tokens: int | None, engine: str = "local") -> dict:
    """One `profile` command in a fresh process: its manifest, wall time and peak RSS."""
    cmd = [sys.executable, "-m", "sam_viz", "profile", "--model", model, "--corpus", source,
           "--context", str(CONTEXT), "--engine", engine, "--json"]
    if max_tokens is not None:
        cmd += ["--max-tokens", str(max_tokens)]
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "SAM_VIZ_PROFILE_DIR": root, "HF_HUB_OFFLINE": "1"}
        logs = Path(root) / "out.txt", Path(root) / "err.txt"
        t0 = time.perf_counter()
        with open(logs[0], "w") as out, open(logs[1], "w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
            _, status, usage = os.wait4(proc.pid, 0)                        # this child's own rusage
        wall = time.perf_counter() - t0
        out, err = (p.read_text() for p in logs)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"profile failed ({os.waitstatus_to_exitcode(status)}): {err.strip().splitlines()[-1:]}")
    manifest = json.loads(out.strip().splitlines()[-1])
    return {"engine": engine, "tokens": manifest["tokens"], "wall_s": round(manifest["wall_s"], 2),
            "tokens_per_s": round(manifest["tokens"] / manifest["wall_s"], 1), "process_s": round(wall, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}               # ru_maxrss is in KiB on Linux


def dense_rate(loaded, source: str, max_tokens: int | None) -> float:
    """Tokens/s of a plain dense forward (base_model) over the profile's windows."""
    stream = tokenize(loaded, read_corpus(source), CONTEXT, max_tokens)
    ids = torch.from_numpy(stream.ids[:stream.limit].reshape(-1, CONTEXT).copy())
    with torch.no_grad():
        loaded.model.base_model(input_ids=ids[:BATCH])                     # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(ids), BATCH):
            loaded.model.base_model(input_ids=ids[i:i + BATCH])
    return stream.limit / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--corpus", default="models/demo/heldout.txt", help="the larger corpus (100k tokens)")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    loaded = load_model(args.model)
    result = {"model": args.model, "context": CONTEXT, "policy": "topk", "density": 0.1, "local": [],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
                         f"{torch.get_num_threads()} torch threads",
              "command": "python -m bench.profile " + " ".join(sys.argv[1:] if argv is None else argv)}
    for source, n in (("builtin:calibration", None), (args.corpus, 10240)):
        _local_row(result, loaded, args.model, source, n)
    local, ray = (run_profile(args.model, args.corpus, 51200, engine) for engine in ("local", "ray"))
    result["ray_50k"] = {"local": local, "ray": ray, "wall_ratio": round(ray["wall_s"] / local["wall_s"], 2),
                         "process_overhead_s": round(ray["process_s"] - local["process_s"], 1)}
    _save(result)
    _local_row(result, loaded, args.model, args.corpus, 102400)
    small, large = (row["peak_rss_mb"] for row in result["local"][1:3])
    result["memory"] = {"peak_rss_mb_10k": small, "peak_rss_mb_100k": large, "growth_mb": round(large - small, 1)}
    _save(result)
    return result


def _local_row(result: dict, loaded, model: str, source: str, n: int | None) -> None:
    row = {"corpus": source, "max_tokens": n, **run_profile(model, source, n)}
    row["dense_tokens_per_s"] = round(dense_rate(loaded, source, n), 1)
    row["profile_vs_dense"] = round(row["tokens_per_s"] / row["dense_tokens_per_s"], 3)
    result["local"].append(row)
    _save(result)                                       # after every run: a long benchmark keeps what it measured


def _save(result: dict) -> None:
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
