"""The predictor trained on the built-in calibration text vs on a corpus (issue 14): held-out recall
of the oracle top-k at densities 0.1 / 0.25 / 0.5, and the cost the predictor adds per token.

    python -m bench.calibration_corpus [--model minilm] [--corpus models/demo/heldout.txt]
        [--train-tokens 131072] [--eval-tokens 8192]

Both calibrations are trained here with the same Settings (sam_viz.sparse_ops.calibration.calibrate: the
built-in train split, then the corpus' first --train-tokens tokens in windows of 128, as
`python -m sam_viz calibrate --corpus` does). Recall is the predictor policy's: per token the k
neurons with the highest predicted score (stable sort, as sam_viz.sparse_ops.mlp) against the k largest
|h| of the dense model, micro-averaged over every token and layer, on two held-out sets: the
built-in held-out split (what bench/routing measures) and windows of the corpus' documents that
training never saw. Cost: the predictor's FLOPs per token against the dense MLP's, and its wall
time per token against the dense MLP's (same x, one thread). Writes bench/results/calibration_corpus.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

from sam_viz.models import load_model
from sam_viz.profile.corpus import read_corpus, tokenize
from sam_viz.sparse_ops import Policy, calibration_texts, install
from sam_viz.sparse_ops.calibration import Collector, _forward_with, calibrate, collect
from sam_viz.sparse_ops.context import Run
from sam_viz.sparse_ops.kernels import reference
from sam_viz.sparse_ops.mlp import activations

DENSITIES = (0.1, 0.25, 0.5)
CONTEXT = 128
OUT = Path(__file__).parent / "results" / "calibration_corpus.json"


def held_out_windows(stream, train_tokens: int, eval_tokens: int) -> torch.Tensor:
    """Windows after the training tokens whose documents training never saw."""
    seen = int(stream.doc[train_tokens - 1])
    start = int(torch.searchsorted(torch.from_numpy(stream.doc), seen, right=True))
    start = -(-start // CONTEXT) * CONTEXT
    n = min(eval_tokens, stream.limit - start) // CONTEXT * CONTEXT
    if n <= 0:
        raise SystemExit("the corpus has no documents left for evaluation; lower --train-tokens")
    return torch.from_numpy(stream.ids[start:start + n].reshape(-1, CONTEXT).copy())


def windows_collector(loaded, windows: torch.Tensor) -> Collector:
    collector = Collector(limit=windows.numel())
    for i in range(0, len(windows), 16):
        ids = windows[i:i + 16]
        _forward_with(loaded, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                      Run(policy=Policy("dense"), kernel=reference, collector=collector))
    return collector


def recall(cal, collector: Collector, density: float) -> float:
    hits = total = 0
    for unit in sorted(collector.x):
        x, h = collector.data(unit)
        k = Policy("topk", density).k(h.shape[-1])
        pred = torch.sort(cal.scores(unit, x), dim=-1, descending=True, stable=True).indices[:, :k]
        oracle = torch.sort(h.abs(), dim=-1, descending=True, stable=True).indices[:, :k]
        mask = torch.zeros_like(h, dtype=torch.bool).scatter_(1, oracle, True)
        hits += int(mask.gather(1, pred).sum())
        total += pred.numel()
    return hits / total


def costs(loaded, cal, collector: Collector) -> dict:
    """Predictor vs dense MLP per token: FLOPs, and wall time on the collected x (one thread)."""
    wrappers = install(loaded)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flops_p = flops_m = time_p = time_m = 0.0
        for unit in sorted(collector.x):
            w = wrappers[unit[0]].weights(unit[1] if unit[1] >= 0 else None)
            x = collector.data(unit)[0][:2048]
            flops_p += cal.predictor_cost(unit)[0]
            flops_m += 2 * (w.gate.numel() + (w.up.numel() if w.up is not None else 0) + w.down_t.numel())
            time_p += _per_token(lambda: cal.scores(unit, x), len(x))
            time_m += _per_token(lambda: activations(x, w) @ w.down_t, len(x))
    finally:
        torch.set_num_threads(threads)
    return {"predictor_flops_per_token": flops_p, "mlp_flops_per_token": flops_m,
            "flops_vs_mlp": flops_p / flops_m, "predictor_us_per_token": time_p * 1e6,
            "mlp_us_per_token": time_m * 1e6, "time_vs_mlp": time_p / time_m}


def _per_token(fn, n: int, repeats: int = 5) -> float:
    with torch.no_grad():
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best / n


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.calibration_corpus")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--corpus", default="models/demo/heldout.txt")
    parser.add_argument("--train-tokens", type=int, default=131072)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    loaded = load_model(args.model)
    corpus = read_corpus(args.corpus)
    stream = tokenize(loaded, corpus, CONTEXT)
    train = torch.from_numpy(stream.ids[:args.train_tokens].reshape(-1, CONTEXT).copy())
    eval_sets = {"builtin held-out split": collect(loaded, calibration_texts()["held_out"], lambda f, t: None)[0],
                 "corpus held-out documents": windows_collector(loaded, held_out_windows(stream, train.numel(),
                                                                                         args.eval_tokens))}
    cals, rows = {}, []
    for name, windows in (("builtin", None), ("corpus", train)):
        t0 = time.perf_counter()
        cal = calibrate(loaded, thresholds=False, windows=windows,
                        corpus=None if windows is None else {"source": args.corpus, "hash": corpus.hash})
        cals[name] = (cal, time.perf_counter() - t0)
        for density in DENSITIES:
            rows.append({"trained_on": name, "train_tokens": cal.n_tokens, "density": density,
                         **{f"recall ({k})": recall(cal, c, density) for k, c in eval_sets.items()}})
    result = {
        "model": args.model, "corpus": args.corpus, "context": CONTEXT,
        "settings": cals["builtin"][0].settings.__dict__,
        "eval_tokens": {k: sum(c.count.values()) // len(c.count) for k, c in eval_sets.items()},
        "calibration_s": {k: round(v[1], 1) for k, v in cals.items()},
        "calibration_s_per_1k_tokens": {k: round(1000 * v[1] / v[0].n_tokens, 3) for k, v in cals.items()},
        "rows": rows, "cost": costs(loaded, cals["corpus"][0], eval_sets["corpus held-out documents"]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads (2 shared cores)",
        "command": "python -m bench.calibration_corpus " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(json.dumps(r))
    print(json.dumps(result["cost"]))
    return result


if __name__ == "__main__":
    main()
