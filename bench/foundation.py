"""Foundation numbers: minilm load time, analyze time at 64 tokens, trace size at 512 tokens,
and minilm embedding cosine vs dense for topk / threshold at densities 0.1, 0.25, 0.5.

    python -m bench.foundation [--json]

Times are medians over repeats on this machine; the cosine table is deterministic.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sam_viz.models import load_model
from sam_viz import RunSpec, analyze

SENTENCES = (
    "The harbour was quiet except for the gulls circling above the fishing boats.",
    "Researchers measured how quickly the glacier retreated over the past decade.",
    "If you heat ice, it melts into water, and if you keep heating, the water boils.",
    "The museum's new wing displays sculptures from West Africa and the Pacific.",
    "Our train was delayed by an hour because of a signal failure near the station.",
    "A good night's sleep improves memory, mood and the ability to concentrate.",
)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def prompt_of(loaded, n_tokens: int) -> str:
    words = " ".join(SENTENCES * 40).split()
    ids = loaded.tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][: n_tokens - 2]
    return loaded.tokenizer.decode(ids)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.foundation")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    report = {"threads": torch.get_num_threads(), "kernel": RunSpec(prompt="x").kernel}   # the default: cpu if built

    report["load_minilm_ms"] = _median_ms(lambda: load_model("minilm"), 3)
    m = load_model("minilm")
    p64 = prompt_of(m, 64)
    spec64 = RunSpec(prompt=p64, policy="topk", density=0.5)
    analyze(m, spec64)                                             # warm up
    report["analyze_64_tokens_ms"] = _median_ms(lambda: analyze(m, spec64), args.repeats)
    report["analyze_64_tokens_split_ms"] = analyze(m, spec64).timings_ms
    spec512 = RunSpec(prompt=prompt_of(m, 512), policy="topk", density=0.5)
    a512 = analyze(m, spec512)
    report["tokens_512"] = len(a512.tokens)
    report["trace_512_bytes"] = a512.trace_nbytes()
    report["analyze_512_tokens_ms"] = _median_ms(lambda: analyze(m, spec512), 3)

    table = []
    for policy in ("topk", "threshold"):
        for density in (0.1, 0.25, 0.5):
            cos = [analyze(m, RunSpec(prompt=s, policy=policy, density=density)).compare["cosine"] for s in SENTENCES]
            table.append({"policy": policy, "density": density, "cosine_mean": statistics.mean(cos),
                          "cosine_min": min(cos)})
    report["cosine_vs_dense"] = table

    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for k, v in report.items():
            if k != "cosine_vs_dense":
                print(f"{k:28s} {v}")
        print("\npolicy     density  cosine(mean)  cosine(min)")
        for row in table:
            print(f"{row['policy']:10s} {row['density']:7.2f}  {row['cosine_mean']:12.4f}  {row['cosine_min']:11.4f}")
    return report


if __name__ == "__main__":
    main()
