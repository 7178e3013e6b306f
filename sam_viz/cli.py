"""`python -m sam_viz analyze ...`: the analysis from the command line; `eval` measures held-out
perplexity (sam_viz.evaluate), `attribute`, `bench` and `calibrate` as their help says.

User mistakes exit 2 with one line on stderr beginning `error:`; never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from models import DEFAULT_MODEL, InputError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m sam_viz", description="Sparse activation analysis of a prompt.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    a = sub.add_parser("analyze", help="run a prompt densely and sparsely and compare")
    a.add_argument("--model", default=DEFAULT_MODEL, help="minilm, tiny-*, a checkpoint dir, or hf:org/name")
    a.add_argument("--prompt", required=True)
    a.add_argument("--policy", default="topk", help="dense, topk, threshold, predictor or static")
    a.add_argument("--density", default="0.5", help="share of MLP neurons computed per token, in (0, 1]")
    a.add_argument("--kernel", default="reference")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    t = sub.add_parser("attribute", help="token and neuron attribution, dense vs sparse (captum)")
    t.add_argument("--model", default=DEFAULT_MODEL)
    t.add_argument("--prompt", required=True)
    t.add_argument("--policy", default="topk")
    t.add_argument("--density", default="0.5")
    t.add_argument("--kernel", default="reference")
    t.add_argument("--method", default="ig", help="ig (integrated gradients) or ixg (input x gradient, fast)")
    t.add_argument("--steps", default="50", help="integration steps for ig")
    t.add_argument("--target", default=None, help="causal LMs: the next token to explain (default: the "
                   "dense model's top token)")
    t.add_argument("--json", action="store_true")
    b = sub.add_parser("bench", help="benchmarks: kernels (sparse MLP vs dense vs the bandwidth floor), "
                       "decode (greedy tokens/s of a random TinyLlama-shaped model, dense vs sparse)")
    b.add_argument("what", choices=["kernels", "decode"])
    b.add_argument("--quick", action="store_true", help="fewer shapes, steps and repeats (under a minute)")
    b.add_argument("--json", action="store_true")
    e = sub.add_parser("eval", help="next-token perplexity of a causal LM on a text (default: the demo "
                       "LMs' held-out split), dense or sparse")
    e.add_argument("--model", default="demo-lm", help="a causal LM spec: demo-lm, demo-lm-dense, tiny-*, a "
                   "checkpoint dir, or hf:org/name")
    e.add_argument("--policy", default="dense")
    e.add_argument("--density", default="0.5")
    e.add_argument("--kernel", default="reference")
    e.add_argument("--text", default=None, help="a UTF-8 text file; documents separated by <|endoftext|> "
                   "(none: one document). Default: models/demo/heldout.txt")
    e.add_argument("--max-tokens", default=None, help="score only the first whole windows holding at most "
                   "this many predicted tokens (default: all)")
    e.add_argument("--context", default="128", help="tokens per window (the demo LMs trained on 128)")
    e.add_argument("--json", action="store_true")
    c = sub.add_parser("calibrate", help="train and store thresholds, predictors and static sets for a model")
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--force", action="store_true", help="train again even if a calibration is stored")
    return parser


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger().setLevel(logging.ERROR)


def cmd_analyze(args) -> int:
    from models import load_model

    from .analysis import analyze
    from .spec import RunSpec

    spec = RunSpec(prompt=args.prompt, model=args.model, policy=args.policy, density=args.density,
                   kernel=args.kernel)
    _quiet_libraries()

    def progress(frac: float, text: str) -> None:        # only the slow first-use calibration is worth a line
        if text.startswith("first use") and "training" in text:
            print(text, file=sys.stderr, flush=True)

    result = analyze(load_model(spec.model), spec, progress=progress)
    if args.json:
        print(json.dumps(_finite(result.to_json()), allow_nan=False))
        return 0
    print(f"{spec.model}  policy={spec.policy}  target={spec.density:g}  tokens={len(result.tokens)}  "
          f"density={result.density:.4f}")
    print("layer  density  mass_kept  recall  precision")
    for row in result.to_json()["layers"]:
        print(f"{row['layer']:>5}  {row['density']:7.4f}  {row['mass_kept']:9.4f}  "
              f"{_fmt(row['recall'])}  {_fmt(row['precision'])}")
    print("  ".join(f"{k}={v:.6g}" for k, v in result.compare.items()))
    return 0


def cmd_attribute(args) -> int:
    from models import load_model

    from .attribution import attribute
    from .spec import RunSpec

    spec = RunSpec(prompt=args.prompt, model=args.model, policy=args.policy, density=args.density,
                   kernel=args.kernel)
    try:
        steps = int(args.steps)
    except ValueError:
        raise InputError(f"steps must be a whole number, got '{str(args.steps)[:20]}'") from None
    _quiet_libraries()
    loaded = load_model(spec.model)
    target_id = _target_id(loaded, args.target) if args.target is not None else None
    result = attribute(loaded, spec, method=args.method, steps=steps, target_id=target_id)
    if args.json:
        print(json.dumps(_finite(result.to_json()), allow_nan=False))
        return 0
    print(f"{spec.model}  {spec.policy} at {spec.density:g}  method={result.method}  target={result.target}")
    print(f"{'token':>16}  {'dense':>9}  {'sparse':>9}")
    for tok, d, s in zip(result.tokens, result.dense, result.sparse):
        print(f"{tok[:16]:>16}  {d:9.4f}  {s:9.4f}")
    print(f"delta dense={result.delta_dense}  delta sparse={result.delta_sparse}")
    print("attribution mass lost per layer: " + " ".join(f"{x:.3f}" for x in result.mass_lost))
    return 0


def _target_id(loaded, token: str) -> int:
    if loaded.kind != "causal-lm":
        raise InputError("--target is for causal language models; encoders explain the embedding cosine")
    ids = loaded.plain_ids(token)
    if len(ids) != 1:
        raise InputError(f"target '{token[:40]}' is {len(ids)} tokens for this tokenizer; give a single token")
    return ids[0]


def cmd_eval(args) -> int:
    import time

    from models import load_model

    from .evaluate import EvalSpec, evaluate, read_text

    spec = EvalSpec(model=args.model, policy=args.policy, density=args.density, kernel=args.kernel,
                    text=args.text, max_tokens=args.max_tokens, context=args.context)
    text = read_text(spec.text)
    _quiet_libraries()
    loaded = load_model(spec.model)
    start, shown = time.perf_counter(), [time.perf_counter()]

    def progress(done: int, total: int) -> None:           # a line every 5 s, on stderr
        now = time.perf_counter()
        if now - shown[0] >= 5 or (done == total and now - start >= 5):
            shown[0] = now
            print(f"eval: {done}/{total} windows, {done * spec.context / (now - start):,.0f} tokens/s",
                  file=sys.stderr, flush=True)

    def calibrating(frac: float, text: str) -> None:
        print(f"first use of {spec.policy} on this model: {text}", file=sys.stderr, flush=True)

    result = evaluate(loaded, spec, text, progress=progress, calibrating=calibrating)
    if args.json:
        print(json.dumps(_finite(result.to_json()), allow_nan=False))
        return 0
    print(f"{spec.model}  policy={spec.policy}  density={spec.density:g}  text={result.to_json()['text']}  "
          f"windows={result.windows}  tokens={result.tokens}")
    print(f"perplexity={result.perplexity:.4f}  loss={result.loss:.6f}  mlp_density={result.mlp_density:.4f}")
    return 0


def cmd_bench(args) -> int:
    from bench import decode, kernels

    _quiet_libraries()
    bench = {"kernels": kernels, "decode": decode}[args.what]
    return bench.main((["--quick"] if args.quick else []) + (["--json"] if args.json else []))


def _fmt(x) -> str:
    return f"{x:6.4f}" if x is not None else "     -"


def cmd_calibrate(args) -> int:
    import time

    from models import load_model
    from sparse_ops import calibration

    _quiet_libraries()
    loaded = load_model(args.model)
    path = calibration.path_for(loaded)
    if path.is_file() and not args.force:
        print(f"{args.model}: already calibrated ({path}); --force trains again")
        return 0
    t0 = time.perf_counter()
    last = [-1]

    def progress(frac: float, text: str) -> None:
        if int(frac * 20) != last[0]:
            last[0] = int(frac * 20)
            print(f"[{frac:4.0%}] {text}", file=sys.stderr, flush=True)

    cal = calibration.calibrate(loaded, progress=progress)
    calibration.save(cal, path)
    print(f"{args.model}: calibrated on {cal.n_tokens} tokens in {time.perf_counter() - t0:.1f} s: "
          f"{len(cal.predictors)} predictors (rank {next(iter(cal.predictors.values()))[0].shape[0]}), "
          f"static sets and thresholds "
          f"for {len(cal.thresholds)} densities -> {path}")
    return 0


def _finite(obj):
    """JSON has no NaN / Infinity: non-finite numbers become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return {"analyze": cmd_analyze, "attribute": cmd_attribute, "bench": cmd_bench,
                "calibrate": cmd_calibrate, "eval": cmd_eval}[args.command](args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug, but still one line for the user
        if os.environ.get("SAM_VIZ_DEBUG"):
            raise
        print(f"error: internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
              "rerun with SAM_VIZ_DEBUG=1 for details", file=sys.stderr)
        return 1
