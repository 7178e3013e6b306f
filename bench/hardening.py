"""Hardening numbers for issue 15: the property searches of tests/test_hardening_cli.py and
tests/test_hardening_app.py run with a larger budget, how many inputs each surface was given, and
the trace size and the analysis time of the longest prompt on a model with a wide MLP.

    python -m bench.hardening [--examples 200] [--json]

Writes bench/results/hardening.json. The searches run in a pytest subprocess (the same properties,
SAM_VIZ_HARDENING_EXAMPLES inputs per CLI command and an eighth of it per page); a failure there
prints hypothesis' minimal example and exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "hardening.json"
TESTS = ("tests/test_hardening_cli.py", "tests/test_hardening_app.py")


def search(examples: int) -> tuple[int, dict, float]:
    """(pytest's exit status, inputs tried per surface and command or page, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        counts = Path(tmp) / "counts.json"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "SAM_VIZ_HARDENING_EXAMPLES": str(examples),
               "SAM_VIZ_HARDENING_COUNTS": str(counts)}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT,
                              env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            sys.stderr.write(proc.stdout[-6000:])
        return proc.returncode, json.loads(counts.read_text()) if counts.is_file() else {}, seconds


def longest_prompt(d_ff: int = 4096) -> dict:
    """Trace bytes per token per layer and the analysis time at MAX_TOKENS on a d_ff-wide tiny Llama."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sam_viz.models import load_model
    from sam_viz.models.loading import MAX_TOKENS, minilm_path
    from sam_viz import RunSpec, analyze
    from sam_viz.analysis import truncate_to_tokens

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=d_ff, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        LlamaForCausalLM(config).save_pretrained(Path(tmp) / "wide", safe_serialization=True)
        tokenizer.save_pretrained(Path(tmp) / "wide")
        os.environ["SAM_VIZ_MODEL_ROOTS"] = tmp
        spec = str(Path(tmp) / "wide")
        loaded = load_model(spec)
        prompt = truncate_to_tokens(loaded, "The lighthouse keeper counted ships all night. " * 120, MAX_TOKENS)
        rows = []
        for density in (0.1, 0.5, 1.0):
            t0 = time.perf_counter()
            a = analyze(loaded, RunSpec(prompt=prompt, model=spec, policy="topk", density=density, kernel="reference"))
            seconds = time.perf_counter() - t0
            per = a.trace_nbytes() / (len(a.tokens) * a.n_layers)
            rows.append({"density": density, "tokens": len(a.tokens), "d_ff": a.d_ff, "layers": a.n_layers,
                         "trace_bytes": a.trace_nbytes(), "bytes_per_token_per_layer": round(per, 1),
                         "bytes_per_computed_neuron": round(per / max(1, round(density * d_ff)), 3),
                         "analyze_s": round(seconds, 2)})
        return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="inputs per CLI command (an eighth per page)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    status, counts, seconds = search(args.examples)
    result = {"examples": args.examples, "search_passed": status == 0, "search_s": round(seconds, 1),
              "inputs_tried": counts,        # "<command> exit <rc>" keys split a command's count by exit status
              "inputs_tried_total": {k: sum(n for c, n in v.items() if " exit " not in c) for k, v in counts.items()},
              "longest_prompt": longest_prompt()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"search ({'passed' if status == 0 else 'FAILED'}, {seconds:.0f} s): {result['inputs_tried_total']}")
        for surface, per in counts.items():
            print(f"  {surface}: " + ", ".join(f"{k} {v}" for k, v in sorted(per.items())))
        for row in result["longest_prompt"]["rows"]:
            print(f"  {row['tokens']} tokens, d_ff {row['d_ff']}, topk {row['density']:g}: "
                  f"{row['bytes_per_token_per_layer']:,} bytes per token per layer "
                  f"({row['bytes_per_computed_neuron']} per computed neuron), analyze {row['analyze_s']} s")
    sys.exit(0 if status == 0 else 1)


if __name__ == "__main__":
    main()
