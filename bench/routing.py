"""Routing quality on held-out calibration text: for each policy and density, recall of the oracle
top-k, mass kept and output quality vs dense (embedding cosine for encoders, KL for causal LMs),
plus the MLP weights each policy reads per token (predictor included) as a share of dense.

    python -m bench.routing [--model minilm] [--texts 30] [--json]

Calibrates the model first when nothing is stored (python -m sam_viz calibrate does it once).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import transformers

from sam_viz.models import load_model
from sam_viz import RunSpec, analyze
from sam_viz.sparse_ops import calibration_texts, get_calibration

POLICIES = ("topk", "threshold", "predictor", "static")
DENSITIES = (0.1, 0.25, 0.5)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.routing")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--texts", type=int, default=30, help="held-out texts to average over")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    m = load_model(args.model)
    t0 = time.perf_counter()
    cal = get_calibration(m)
    calib_s = time.perf_counter() - t0
    texts = calibration_texts()["held_out"][: args.texts]
    metric = "cosine" if m.kind == "encoder" else "kl"
    rows = []
    for density in DENSITIES:
        for policy in POLICIES:
            rec, mass, quality, cost = [], [], [], []
            for text in texts:
                a = analyze(m, RunSpec(prompt=text, model=args.model, policy=policy, density=density))
                hits = sum(float(l.hits.sum()) for l in a.layers)
                rec.append(hits / sum(float(l.oracle.sum()) for l in a.layers))
                mass.append(sum(float(l.mass_kept.sum()) for l in a.layers) / sum(float(l.mass_total.sum())
                                                                                  for l in a.layers))
                quality.append(a.compare[metric])
                cost.append(a.cost["ratio"])
            rows.append({"model": args.model, "policy": policy, "density": density, "recall": statistics.mean(rec),
                         "mass_kept": statistics.mean(mass), metric: statistics.mean(quality),
                         "weights_read_vs_dense": statistics.mean(cost), "texts": len(texts)})
    rank = next(iter(cal.predictors.values()))[0].shape[0]
    if args.json:
        print(json.dumps({"calibration_s": calib_s, "predictor_rank": rank, "rows": rows}, indent=1))
    else:
        print(f"{args.model}: calibration {'loaded' if calib_s < 5 else 'trained'} in {calib_s:.1f} s "
              f"(predictor rank {rank}, {cal.n_tokens} train tokens); {len(texts)} held-out texts")
        print(f"density  policy      recall  mass_kept  {metric:>7}  weights read (x dense)")
        for r in rows:
            print(f"{r['density']:7.2f}  {r['policy']:10s}  {r['recall']:6.3f}  {r['mass_kept']:9.3f}  "
                  f"{r[metric]:7.4f}  {r['weights_read_vs_dense']:.3f}")
    return rows


if __name__ == "__main__":
    main()
