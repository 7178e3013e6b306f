"""Time of one attribution (dense + sparse, token IG with 50 steps plus neuron attribution) on
minilm at 32 tokens, and of the fast input-x-gradient option.

    python -m bench.attribution [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import transformers

from bench.foundation import prompt_of
from sam_viz.models import load_model
from sam_viz import RunSpec
from sam_viz.attribution import attribute


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.attribution")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    transformers.logging.set_verbosity_error()
    m = load_model("minilm")
    spec = RunSpec(prompt=prompt_of(m, 32), policy="topk", density=0.5)
    attribute(m, spec, steps=5)                                          # warm up
    for method, steps in (("ig", 50), ("ixg", 1)):
        times, deltas = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            a = attribute(m, spec, method=method, steps=max(2, steps))
            times.append(time.perf_counter() - t0)
            deltas.append((a.delta_dense, a.delta_sparse))
        print(f"minilm, {len(a.tokens)} tokens, {method}{f' {steps} steps' if method == 'ig' else ''}: "
              f"median {statistics.median(times):.2f} s (runs {', '.join(f'{t:.2f}' for t in times)}); "
              f"delta dense/sparse {deltas[-1]}; mass lost {[x if x is None else round(x, 3) for x in a.mass_lost]}")


if __name__ == "__main__":
    main()
