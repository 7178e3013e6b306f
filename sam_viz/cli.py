"""`python -m sam_viz analyze ...` (or `sam-viz analyze ...` once installed): the analysis, attribution,
benchmarks, calibration, the kernel build, held-out perplexity (`eval`, sam_viz.evaluate) and corpus
profiles (`profile`, sam_viz.profile) from the command line.

User mistakes exit 2 with one line on stderr beginning `error:`; never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import unicodedata
from dataclasses import replace

from sam_viz.models import DEFAULT_MODEL, InputError

EXIT_USAGE = 2
CALIBRATION_CONTEXT = 128      # tokens per window of calibrate --corpus
KERNEL_HELP = "reference, cpu or triton (default: cpu where it is built, else reference)"
SCOPE_HELP = "mlp (the MLP's neurons, the default) or all (every projection's input: dense, topk, teal or wina)"
ALLOCATION_HELP = "teal and wina: uniform (every projection at the density) or greedy (TEAL's, the default)"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        raise InputError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m sam_viz", description="Sparse activation analysis of a prompt.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    a = sub.add_parser("analyze", help="run a prompt densely and sparsely and compare")
    a.add_argument("--model", default=DEFAULT_MODEL, help="minilm, tiny-*, a checkpoint dir, or hf:org/name")
    a.add_argument("--prompt", required=True)
    a.add_argument("--policy", default="topk", help="dense, topk, threshold, predictor or static; under "
                   "--scope all: dense, topk, teal or wina")
    a.add_argument("--density", default="0.5", help="share of MLP neurons (scope all: of each projection's "
                   "input entries) computed per token, in (0, 1]")
    a.add_argument("--kernel", default=None, help=KERNEL_HELP)
    _scope_flags(a)
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.add_argument("--truncate", action="store_true", help="a prompt over the model's token limit: analyse "
                   "its first tokens instead of refusing it")
    t = sub.add_parser("attribute", help="token and neuron attribution, dense vs sparse (captum)")
    t.add_argument("--model", default=DEFAULT_MODEL)
    t.add_argument("--prompt", required=True)
    t.add_argument("--policy", default="topk")
    t.add_argument("--density", default="0.5")
    t.add_argument("--kernel", default=None, help=KERNEL_HELP)
    _scope_flags(t)
    t.add_argument("--method", default="ig", help="ig (integrated gradients) or ixg (input x gradient, fast)")
    t.add_argument("--steps", default="50", help="integration steps for ig")
    t.add_argument("--target", default=None, help="causal LMs: the next token to explain (default: the "
                   "dense model's top token)")
    t.add_argument("--query", default=None, help="encoders: explain the cosine of the prompt's embedding to "
                   "this sentence's (dense) embedding (default: the prompt's first sentence when it has several, "
                   "else a fixed question)")
    t.add_argument("--json", action="store_true")
    b = sub.add_parser("bench", help="benchmarks: kernels (sparse MLP vs dense vs the bandwidth floor), "
                       "decode (greedy tokens/s of a random TinyLlama-shaped model, dense vs sparse)")
    b.add_argument("what", choices=["kernels", "decode"])
    b.add_argument("--quick", action="store_true", help="fewer shapes, steps and repeats (under a minute)")
    b.add_argument("--json", action="store_true")
    b.add_argument("--input", action="store_true", help="kernels: the input kernel (a projection with a sparse "
                   "input, scope all) instead of the MLP's")
    b.add_argument("--scope", default="mlp", choices=["mlp", "all"], help="decode: mlp (static on the MLPs, the "
                   "default) or all (whole-model topk on every projection's input)")
    sub.add_parser("build-kernels", help="build the compiled cpu kernel now (make does), so that it is the "
                   "default kernel; without a C++ compiler, a warning and exit 0")
    e = sub.add_parser("eval", help="next-token perplexity of a causal LM on a text (default: the demo "
                       "LMs' held-out split), dense or sparse")
    e.add_argument("--model", default="demo-lm", help="a causal LM spec: demo-lm, demo-lm-dense, tiny-*, a "
                   "checkpoint dir, or hf:org/name")
    e.add_argument("--policy", default="dense")
    e.add_argument("--density", default="0.5")
    e.add_argument("--kernel", default=None, help=KERNEL_HELP)
    _scope_flags(e)
    e.add_argument("--text", default=None, help="a UTF-8 text file; documents separated by <|endoftext|> "
                   "(none: one document). Default: models/demo/heldout.txt")
    e.add_argument("--max-tokens", default=None, help="score only the first whole windows holding at most "
                   "this many predicted tokens (default: all)")
    e.add_argument("--context", default="128", help="tokens per window (the demo LMs trained on 128)")
    e.add_argument("--json", action="store_true")
    c = sub.add_parser("calibrate", help="train and store thresholds, predictors and static sets for a model")
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--force", action="store_true", help="train again even if a calibration is stored")
    c.add_argument("--corpus", default=None, help="train on a corpus instead of the built-in text: a .txt, "
                   ".jsonl, .csv or .parquet file, or builtin:calibration (replaces the stored calibration)")
    c.add_argument("--text-column", default=None, help="the text column of a .jsonl, .csv or .parquet corpus")
    c.add_argument("--max-tokens", default=None, help="train on at most this many corpus tokens (default: all)")
    c.add_argument("--scope", default="mlp", help="mlp: thresholds, predictors and static sets of the MLP's "
                   "neurons (the default); all: the input calibration of every projection (teal, wina)")
    c.add_argument("--allocation", default="greedy", help="uniform or greedy: checked as the other commands check "
                   "it; calibrate --scope all stores both allocations")
    _profile_parser(sub)
    return parser


def _scope_flags(parser) -> None:
    parser.add_argument("--scope", default="mlp", help=SCOPE_HELP)
    parser.add_argument("--allocation", default="greedy", help=ALLOCATION_HELP)


def _profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="profile a model over a corpus: per layer and neuron firing, examples, "
                       "co-firing and logit effects, stored under SAM_VIZ_PROFILE_DIR (default ./profiles)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="minilm, tiny-*, a checkpoint dir, or hf:org/name")
    p.add_argument("--corpus", required=True, help="a .txt (documents split on blank lines), .jsonl, .csv or "
                   ".parquet file, or builtin:calibration")
    p.add_argument("--text-column", default=None, help="the text column of a .jsonl, .csv or .parquet (default: text)")
    p.add_argument("--max-tokens", default=None, help="profile at most this many tokens (whole contexts)")
    p.add_argument("--context", default="128", help="tokens per context window")
    p.add_argument("--policy", default="topk", help="dense, topk, threshold, predictor or static")
    p.add_argument("--density", default="0.1", help="the oracle's and the policy's share of neurons, in (0, 1]")
    p.add_argument("--kernel", default=None, help=KERNEL_HELP)
    _scope_flags(p)
    p.add_argument("--engine", default="local", choices=["local", "ray"])
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (auto, ray://host:port); "
                   "default: start a local one")
    p.add_argument("--workers", default=None, help="Ray workers (model copies)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted profile from its shards")
    p.add_argument("--json", action="store_true", help="print the manifest as one JSON object")


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger().setLevel(logging.ERROR)


def cmd_analyze(args) -> int:
    from sam_viz.models import load_model

    from .analysis import TooManyTokens, analyze, truncate_to_tokens
    from .spec import RunSpec

    spec = RunSpec(prompt=args.prompt, model=args.model, policy=args.policy, density=args.density,
                   kernel=args.kernel, scope=args.scope, allocation=args.allocation)
    _quiet_libraries()

    def progress(frac: float, text: str) -> None:        # only the slow first-use calibration is worth a line
        if text.startswith("first use") and "training" in text.lower():
            print(text, file=sys.stderr, flush=True)

    loaded = load_model(spec.model)
    if args.truncate:
        prompt = truncate_to_tokens(loaded, spec.prompt, loaded.max_tokens)
        if prompt != spec.prompt:
            print(f"note: analysing the first {loaded.max_tokens} tokens ({len(prompt):,} of "
                  f"{len(spec.prompt):,} characters)", file=sys.stderr)
            spec = replace(spec, prompt=prompt)
    try:
        result = analyze(loaded, spec, progress=progress)
    except TooManyTokens as exc:
        raise InputError(f"{exc}; --truncate analyses its first {exc.limit} tokens") from None
    if args.json:
        print(json.dumps(_finite(result.to_json()), allow_nan=False))
        return 0
    print(f"{spec.model}  policy={spec.policy}  scope={spec.scope}  target={spec.density:g}  "
          f"tokens={len(result.tokens)}  density={result.density:.4f}  model_density={_fmt(result.model_density)}")
    print("layer  density  mass_kept  recall  precision")
    for row in result.to_json()["layers"]:
        print(f"{row['layer']:>5}  {row['density']:7.4f}  {row['mass_kept']:9.4f}  "
              f"{_fmt(row['recall'])}  {_fmt(row['precision'])}")
    print("  ".join(f"{k}={v:.6g}" for k, v in result.compare.items()))
    return 0


def cmd_attribute(args) -> int:
    from sam_viz.models import load_model

    from .attribution import attribute
    from .spec import RunSpec

    spec = RunSpec(prompt=args.prompt, model=args.model, policy=args.policy, density=args.density,
                   kernel=args.kernel, scope=args.scope, allocation=args.allocation)
    try:
        steps = int(args.steps)
    except ValueError:
        raise InputError(f"steps must be a whole number, got '{str(args.steps)[:20]}'") from None
    _quiet_libraries()
    loaded = load_model(spec.model)
    target_id = _target_id(loaded, args.target) if args.target is not None else None
    if args.query is not None and loaded.kind == "causal-lm":
        raise InputError("--query is for sentence encoders; causal language models explain a next token (--target)")
    result = attribute(loaded, spec, method=args.method, steps=steps, target_id=target_id, query=args.query)
    if args.json:
        print(json.dumps(_finite(result.to_json()), allow_nan=False))
        return 0
    _print_attribution(spec, result)
    return 0


def _print_attribution(spec, result) -> None:
    print(f"{spec.model}  {spec.policy} at {spec.density:g}  method={result.method}  target={result.target}")
    print(f"{'token':>16}  {'dense':>9}  {'sparse':>9}")
    noise = result.token_noise
    for tok, d, s in zip(result.tokens, result.dense, result.sparse):
        print(f"{tok[:16]:>16}  {'noise' if noise[0] else f'{d:.4f}':>9}  {'noise' if noise[1] else f'{s:.4f}':>9}")
    print(f"delta dense={result.delta_dense}  delta sparse={result.delta_sparse}")
    print("layer  mass_lost  neuron_l1_dense  neuron_l1_sparse")
    for row in result.to_json()["layers"]:
        lost = "noise" if row["mass_lost"] is None else f"{row['mass_lost']:.3f}"
        print(f"{row['layer']:>5}  {lost:>9}  {row['neuron_l1_dense']:15.4g}  {row['neuron_l1_sparse']:16.4g}")
    if any(noise) or any(d or s for d, s in result.neuron_noise):
        print("noise: values within rounding noise of zero (the target's gradient vanishes at the input)")


def _target_id(loaded, token: str) -> int:
    if loaded.kind != "causal-lm":
        raise InputError("--target is for causal language models; encoders explain a query's similarity (--query)")
    ids = loaded.plain_ids(token)
    if len(ids) != 1:
        raise InputError(f"target '{token[:40]}' is {len(ids)} tokens for this tokenizer; give a single token")
    return ids[0]


def cmd_eval(args) -> int:
    import time

    from sam_viz.models import load_model

    from .evaluate import EvalSpec, evaluate, read_text

    spec = EvalSpec(model=args.model, policy=args.policy, density=args.density, kernel=args.kernel,
                    text=args.text, max_tokens=args.max_tokens, context=args.context, scope=args.scope,
                    allocation=args.allocation)
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
    print(f"perplexity={result.perplexity:.4f}  loss={result.loss:.6f}  mlp_density={result.mlp_density:.4f}  "
          f"model_density={_fmt(result.model_density)}")
    return 0


def cmd_profile(args) -> int:
    import time

    from .profile import build_profile
    from .spec import positive_int

    _quiet_libraries()
    shown = [time.perf_counter()]

    def progress(done: int, total: int, message: str) -> None:     # a line every 2 s, and the last
        now = time.perf_counter()
        if now - shown[0] >= 2 or done == total:
            shown[0] = now
            print(f"profile: {done:,}/{total:,} tokens, {message}", file=sys.stderr, flush=True)

    workers = None if args.workers is None else positive_int(args.workers, "workers")
    if args.ray_address is not None:
        if args.engine != "ray":
            raise InputError("--ray-address is for --engine ray")
        from .profile.ray_engine import check_address

        check_address(args.ray_address)                 # before the model loads: a wrong address fails fast
    manifest = build_profile(args.model, args.corpus, policy=args.policy, density=args.density,
                             context=args.context, max_tokens=args.max_tokens, text_column=args.text_column,
                             kernel=args.kernel, engine=args.engine, ray_address=args.ray_address,
                             workers=workers, resume=args.resume, progress=progress, scope=args.scope,
                             allocation=args.allocation)
    if args.json:
        print(json.dumps(_finite(manifest), allow_nan=False))
        return 0
    print(f"profile {manifest['id']}: {manifest['model']} over {manifest['corpus']['source']}, "
          f"{manifest['tokens']:,} tokens, {manifest['wall_s']:.1f} s")
    return 0


def cmd_bench(args) -> int:
    from sam_viz.sparse_ops import unavailable_kernels

    from .benchmarks import decode, input_kernels, kernels

    why = unavailable_kernels().get("cpu")
    if why:
        raise InputError(f"the benchmarks time the cpu kernel, which cannot run here: {why}")
    _quiet_libraries()
    if args.what == "kernels" and args.input:
        settings = input_kernels.QUICK if args.quick else input_kernels.FULL
        rows = input_kernels.run(**settings)
        lines = input_kernels.report(rows, settings["calls"])
    elif args.what == "kernels":
        settings = kernels.QUICK if args.quick else kernels.FULL
        rows = kernels.run(**settings)
        lines = kernels.report(rows, settings["calls"])
    elif args.scope == "all":
        cfg = decode.QUICK if args.quick else decode.DecodeConfig()
        rows = decode.run_all(cfg)
        lines = decode.report_all(rows, cfg)
    else:
        cfg = decode.QUICK if args.quick else decode.DecodeConfig()
        rows = decode.run(cfg)
        lines = decode.report(rows, cfg)
    print(json.dumps(rows, indent=1) if args.json else "\n".join(lines))
    return 0


def cmd_build_kernels(args) -> int:
    """One line: where the cpu kernel is built, or a warning (exit 0 all the same: `make` goes on,
    and the app offers the reference kernel)."""
    import time

    from sam_viz.sparse_ops import cpu

    t0 = time.perf_counter()
    try:
        state, why = cpu.readiness()
        if state == "unavailable":
            raise InputError(f"the cpu kernel cannot be used here: {why}")
        ext = cpu.extension()
        print(f"cpu kernel: ready ({ext.isa()} path, {time.perf_counter() - t0:.0f} s), "
              f"in {cpu.built_library().parent}")
    except Exception as exc:  # noqa: BLE001 - never fail the set-up for an optional kernel
        print(f"warning: {exc}; the app and the CLI use the reference kernel", file=sys.stderr)
    return 0


def _fmt(x) -> str:
    return f"{x:6.4f}" if x is not None else "     -"


def cmd_calibrate(args) -> int:
    import time

    from sam_viz.models import load_model
    from sam_viz.sparse_ops import Policy, calibration

    if args.corpus is None and (args.text_column is not None or args.max_tokens is not None):
        raise InputError("--text-column and --max-tokens are for --corpus")
    Policy("teal" if args.scope == "all" else "dense", scope=args.scope, allocation=args.allocation)   # validated
    if args.scope == "all":
        return _calibrate_inputs(args)
    _quiet_libraries()
    loaded = load_model(args.model)
    path = calibration.path_for(loaded)
    if path.is_file() and not args.force and args.corpus is None:
        print(f"{args.model}: already calibrated ({path}); --force trains again")
        return 0
    windows, corpus = _corpus_windows(loaded, args) if args.corpus is not None else (None, None)
    t0 = time.perf_counter()
    cal = calibration.calibrate(loaded, progress=_progress_lines(), windows=windows, corpus=corpus)
    calibration.save(cal, path)
    source = f"{args.corpus} ({cal.n_tokens:,} tokens)" if corpus else f"{cal.n_tokens} tokens"
    print(f"{args.model}: calibrated on {source} in {time.perf_counter() - t0:.1f} s: "
          f"{len(cal.predictors)} predictors (rank {next(iter(cal.predictors.values()))[0].shape[0]}), "
          f"static sets and thresholds "
          f"for {len(cal.thresholds)} densities -> {path}")
    return 0


def _calibrate_inputs(args) -> int:
    """calibrate --scope all: teal and wina thresholds and allocations (the library's input_calibration).
    Merge point: the whole-model scope's branch adds --scope to the other commands."""
    import time

    from sam_viz.models import load_model
    from sam_viz.sparse_ops import input_calibration

    _quiet_libraries()
    loaded = load_model(args.model)
    input_calibration.declared(loaded)                    # one sentence for a family without projections
    corpus = _corpus_windows(loaded, args) if args.corpus is not None else None
    path = input_calibration.path_for(loaded, input_calibration.InputSettings(), corpus and corpus[0])
    stored = path.is_file() and not args.force
    t0 = time.perf_counter()
    cal = input_calibration.get_input_calibration(loaded, corpus, _progress_lines(), force=args.force)
    how = "stored; --force calibrates again" if stored else f"in {time.perf_counter() - t0:.1f} s"
    print(f"{args.model}: input calibration (teal, wina) on {cal.source} ({how}) -> {path}")
    for line in input_summary(cal):
        print(line)
    return 0


def _progress_lines():
    """A Progress that prints a line on stderr every 5% of the work."""
    last = [-1]

    def progress(frac: float, text: str) -> None:
        if int(frac * 20) != last[0]:
            last[0] = int(frac * 20)
            print(f"[{frac:4.0%}] {text}", file=sys.stderr, flush=True)
    return progress


def input_summary(cal, density: float = 0.5) -> list[str]:
    """Per layer and kind: the greedy input densities at `density` and the block error, greedy vs uniform."""
    names = "".join(f"{p:>6}" for p in cal.projections)
    lines = [f"at density {density:g}: greedy input density per projection; block output error (relative "
             "squared), greedy vs uniform", f"layer  kind{names}    greedy   uniform"]
    for kind in cal.paths:
        for layer in range(len(cal.paths[kind])):
            dens = cal.densities(layer, density, "greedy", kind)
            err = [cal.block_error_at(layer, density, a, kind) for a in ("greedy", "uniform")]
            lines.append(f"{layer + 1:>5}  {kind:<4}" + "".join(f"{dens[p]:6.2f}" for p in cal.projections)
                         + "".join(f"  {e:8.4f}" for e in err))
    return lines


def one_line(text: str) -> str:
    """`text` as one printable line: control, format and separator characters (a newline or an
    escape sequence echoed from the user's input) are written as escapes, e.g. \\n or \\u202e."""
    return "".join(ch if ch == " " or unicodedata.category(ch)[0] not in "CZ" else ch.encode("unicode_escape",
                   "backslashreplace").decode("ascii") for ch in text)


def _corpus_windows(loaded, args):
    """The corpus of `calibrate --corpus` as token windows [W, T] (the profile's reader), and its description."""
    import torch

    from .profile.corpus import read_corpus, tokenize
    from .profile.mapper import ProfileSettings

    context = min(CALIBRATION_CONTEXT, loaded.max_tokens)
    limit = ProfileSettings(context=context, max_tokens=args.max_tokens).max_tokens    # validated
    corpus = read_corpus(args.corpus, args.text_column)
    stream = tokenize(loaded, corpus, context, limit)
    windows = torch.from_numpy(stream.ids[:stream.limit].reshape(-1, context).copy())
    return windows, {"source": corpus.source, "hash": corpus.hash, "tokens": stream.limit,
                     "text_column": corpus.text_column}


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
        if getattr(args, "kernel", "") is None:
            from sam_viz.sparse_ops import default_kernel

            args.kernel = default_kernel()
        return {"analyze": cmd_analyze, "attribute": cmd_attribute, "bench": cmd_bench,
                "build-kernels": cmd_build_kernels, "calibrate": cmd_calibrate, "eval": cmd_eval,
                "profile": cmd_profile}[args.command](args)
    except InputError as exc:
        print(f"error: {one_line(exc.detail)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug, but still one line for the user
        if os.environ.get("SAM_VIZ_DEBUG"):
            raise
        print(f"error: internal error ({type(exc).__name__}: {one_line(str(exc))[:300]}); "
              "rerun with SAM_VIZ_DEBUG=1 for details", file=sys.stderr)
        return 1


def main_entry() -> None:
    """The `sam-viz` command that `pip install` makes (pyproject.toml's project.scripts)."""
    sys.exit(main())
