"""The seed's claim on the demo LMs, measured and written out (sam_viz.claims computes the rows):

- models/demo/claims.json: held-out perplexity, MLP density, FLOPs and weight bytes per token and
  the reproducing command of every setting in sam_viz.claims.plan(), and the decode benchmark;
- models/demo/perplexity_vs_density.png: the curve (matplotlib, as captum brings it);
- README.md: the claims table between <!-- claims:start --> and <!-- claims:end -->.

The decode benchmark is sam_viz.benchmarks.decode's on the shipped demo-lm: batch-1 greedy decode
with the KV cache, dense and sparse runs interleaved, through the `cpu` kernel, with f_mlp, the
Amdahl ideal and the share of it reached. It uses the policies that read fewer weights: `threshold`
(reads every gate row, then only the chosen rows of up and down), `predictor` (dynamic: a low-rank
predictor chooses the neurons from the MLP input before any MLP weight is read) and `static` (the
same neurons for every token). `topk` cannot save work at inference: to rank the neurons it
must compute every h_j, that is read all of W_gate and W_up, and only the dropped neurons' rows of
W_down are saved.

    python -m bench.demo_claims [--max-tokens N] [--no-decode]   # measure: 16 evals of the held-out split
    python -m bench.demo_claims --render                         # PNG and README from claims.json
    python -m bench.demo_claims --add-decode threshold           # measure decode rows only, into claims.json
    python -m bench.demo_claims --resume --threads 1             # only the rows claims.json lacks, each saved
                                                                 # as it arrives (a cut-off run resumes)

Each row's time is in claims.json (`seconds`), and the whole run's (`seconds`, `threads`).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from sam_viz.benchmarks.decode import greedy, ideal_speedup, mlp_share
from sam_viz.models import load_model
from sam_viz import claims as cl
from sam_viz import evaluate as ev
from sam_viz.sparse_ops import Policy, install, sparsified

ROOT = Path(__file__).resolve().parent.parent
PNG = cl.DEMO_DIR / "perplexity_vs_density.png"
README = ROOT / "README.md"
START, END = "<!-- claims:start -->", "<!-- claims:end -->"
DECODE_POLICIES = ("threshold", "predictor", "static")


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def prompt_ids(loaded, n: int) -> torch.Tensor:
    """The held-out split's first n tokens, as eval reads them. [1, n]"""
    return ev.text_tokens(loaded, ev.documents(ev.read_text(None)), n)[:n][None]


def decode_rows(loaded, density: float = cl.TRAINED_DENSITY, policies=DECODE_POLICIES, prompt: int = 16,
                new: int = 64, repeats: int = 5, command: str = "python -m bench.demo_claims") -> list[dict]:
    """Median seconds per greedy step, dense vs each policy through the cpu kernel (interleaved)."""
    install(loaded)
    ids = prompt_ids(loaded, prompt)
    dense, sparse = [], {p: [] for p in policies}
    greedy(loaded.model, ids, 2)
    for p in policies:                                                     # warm up, build the kernel
        with sparsified(loaded, Policy(p, density), kernel="cpu"):
            greedy(loaded.model, ids, 2)
    for r in range(repeats):
        say(f"decode: repeat {r + 1} of {repeats}")
        dense += greedy(loaded.model, ids, new)[1]
        for p in policies:
            with sparsified(loaded, Policy(p, density), kernel="cpu"):
                sparse[p] += greedy(loaded.model, ids, new)[1]
    f_mlp = mlp_share(loaded, ids, new)
    rows = []
    for p in policies:
        dense_tok_s, sparse_tok_s = 1 / statistics.median(dense), 1 / statistics.median(sparse[p])
        speedup, ideal = sparse_tok_s / dense_tok_s, ideal_speedup(f_mlp, density)
        rows.append({"model": loaded.spec, "policy": p, "density": density, "kernel": "cpu",
                     "dense_tok_s": dense_tok_s, "sparse_tok_s": sparse_tok_s, "speedup": speedup,
                     "ideal_speedup": ideal, "share_of_ideal": speedup / ideal, "f_mlp": f_mlp,
                     "threads": torch.get_num_threads(), "prompt": prompt, "new": new, "repeats": repeats,
                     "command": command})
    return rows


def draw_png(claims: dict, path: Path = PNG) -> None:
    """Held-out perplexity against whole-model matrix work, one panel per model, a line per policy
    (label()) through its densities; the dense twin's perplexity and the claim's bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    base = cl.find(claims, cl.DENSE, "dense")
    top = base["perplexity"] * 1.6 if base is not None else math.inf
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), dpi=110, sharey=True)
    names = list(dict.fromkeys(cl.label(r) for r in claims["rows"] if r["policy"] != "dense"))
    colours = dict(zip(names, plt.get_cmap("tab10").colors))
    for ax, model in zip(axes, (cl.SPARSE, cl.DENSE)):
        full = cl.find(claims, model, "dense")
        for name in names:
            rows = sorted((r for r in claims["rows"] if r["model"] == model and r["policy"] != "dense"
                           and cl.label(r) == name), key=lambda r: r["model_work"])
            if rows:
                style = "o-" if "every projection" in name else "s--"
                ax.plot([r["model_work"] for r in rows], [min(r["perplexity"], top) for r in rows], style, ms=4,
                        color=colours[name], label=name)
                for r in (r for r in rows if r["perplexity"] > top):          # off the top: at the edge, with its value
                    ax.annotate(f"{r['perplexity']:.0f}", (r["model_work"], top), xytext=(3, -12),
                                textcoords="offset points", fontsize=7, color=colours[name])
        if full is not None:
            ax.plot([1.0], [full["perplexity"]], "k*", ms=9, label="every weight (dense)")
        if base is not None:
            ax.axhline(base["perplexity"], color="#2ca02c", ls=":", lw=1, label="dense twin")
            ax.axhline(base["perplexity"] * cl.BAR_RATIO, color="#2ca02c", ls="--", lw=1,
                       label=f"bar: dense twin +{cl.BAR_RATIO - 1:.0%}")
        ax.axvline(cl.BAR_WORK, color="grey", ls="--", lw=1, label=f"{cl.BAR_WORK:.0%} of the work")
        ax.set(xlabel="whole-model matrix work (share of the blocks' weights read per token)", title=model,
               yscale="log", xlim=(0.2, 1.02))
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    axes[0].set_ylabel("held-out perplexity (lower is better)")
    axes[0].set_ylim(top=top * 1.02 if base is not None else None)
    handles = {}
    for ax in axes:                                           # every series once, from whichever panel has it
        for h, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, h)
    axes[1].legend(handles.values(), handles.keys(), fontsize=7, loc="upper right")
    fig.suptitle("Held-out perplexity vs whole-model matrix work (points at the top edge: worse, value written)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_readme(claims: dict, path: Path = README) -> None:
    """Replace the README's claims section (between the markers) with the current table."""
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"error: {path} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    body = cl.report_markdown(claims) + f"\n\n![perplexity vs density]({PNG.relative_to(ROOT).as_posix()})"
    path.write_text(f"{head}{START}\n{body}\n{END}{rest.split(END, 1)[1]}", encoding="utf-8")


def render(path: Path = cl.CLAIMS) -> None:
    claims = cl.read_claims(path)
    if claims is None:
        raise SystemExit(f"error: {path} does not exist; run python -m bench.demo_claims first")
    draw_png(claims)
    write_readme(claims)
    say(cl.verdict(claims)["sentence"])


def add_decode(policies: list[str], path: Path = cl.CLAIMS) -> None:
    """Decode rows of `policies` measured now, replacing theirs in the claims file (the others kept)."""
    raw = json.loads(path.read_text())
    rows = decode_rows(load_model(cl.SPARSE), policies=tuple(policies),
                       command=f"python -m bench.demo_claims --add-decode {' '.join(policies)}")
    for r in rows:
        say(f"decode {r['policy']}: dense {r['dense_tok_s']:.1f} tok/s, sparse {r['sparse_tok_s']:.1f} tok/s, "
            f"speedup {r['speedup']:.2f} (ideal {r['ideal_speedup']:.2f}), f_mlp {r['f_mlp']:.3f}")
    order = {p: i for i, p in enumerate(DECODE_POLICIES)}
    kept = [r for r in raw.get("decode", []) if r.get("policy") not in policies]
    raw["decode"] = sorted(kept + rows, key=lambda r: order.get(r.get("policy"), len(order)))
    path.write_text(json.dumps(raw, indent=1) + "\n")


def first(setting: cl.Setting) -> tuple:
    """--resume's order: the whole-model rows at 0.4 and 0.5 first (the verdict's), then the rest."""
    return setting.scope == "mlp", {0.4: 0, 0.5: 1}.get(setting.density, 2)


def write(raw: dict, path: Path = cl.CLAIMS) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(raw, indent=1) + "\n")
    tmp.replace(path)


def resume(path: Path = cl.CLAIMS) -> None:
    """The rows of sam_viz.claims.plan() that claims.json lacks, measured one at a time and saved as each
    arrives; the computed columns of the rows it has brought up to date (sam_viz.claims.resume)."""
    load = functools.lru_cache(maxsize=None)(load_model)
    cl.resume(json.loads(path.read_text()), load, lambda raw: write(raw, path), progress=say, first=first)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.demo_claims", description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first whole windows "
                    "up to N held-out tokens in every row (default: all)")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode benchmark")
    ap.add_argument("--render", action="store_true", help="only redraw the PNG and the README from claims.json")
    ap.add_argument("--add-decode", nargs="+", choices=DECODE_POLICIES, metavar="POLICY",
                    help="measure only these policies' decode rows (with their own dense runs) and put them in "
                    "claims.json in place of any earlier ones")
    ap.add_argument("--resume", action="store_true", help="measure only the rows claims.json lacks (saving it after "
                    "each) and bring the computed columns of the others up to date")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resume:
        resume()
    elif args.add_decode:
        add_decode(args.add_decode)
    elif not args.render:
        t0 = time.perf_counter()
        load = functools.lru_cache(maxsize=None)(load_model)
        claims = cl.measure_claims(load, args.max_tokens, progress=say)
        if not args.no_decode:
            claims["decode"] = decode_rows(load(cl.SPARSE))
        claims["threads"], claims["seconds"] = torch.get_num_threads(), round(time.perf_counter() - t0)
        write(claims)
        say(f"wrote {cl.CLAIMS} in {claims['seconds']} s")
    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
