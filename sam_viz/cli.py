"""`python -m sam_viz analyze ...`: the analysis from the command line.

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
    a.add_argument("--policy", default="topk", help="dense, topk or threshold")
    a.add_argument("--density", default="0.5", help="share of MLP neurons computed per token, in (0, 1]")
    a.add_argument("--kernel", default="reference")
    a.add_argument("--json", action="store_true", help="print one JSON object")
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
    result = analyze(load_model(spec.model), spec)
    if args.json:
        print(json.dumps(_finite(result.to_json()), allow_nan=False))
        return 0
    print(f"{spec.model}  policy={spec.policy}  target={spec.density:g}  tokens={len(result.tokens)}  "
          f"density={result.density:.4f}")
    print("layer  density  mass_kept")
    for row in result.to_json()["layers"]:
        print(f"{row['layer']:>5}  {row['density']:7.4f}  {row['mass_kept']:9.4f}")
    print("  ".join(f"{k}={v:.6g}" for k, v in result.compare.items()))
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
        return {"analyze": cmd_analyze}[args.command](args)
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
