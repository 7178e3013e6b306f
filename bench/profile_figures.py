"""The hot-neuron curves and dead / always-on counts of the README's "Corpus profiles" (issue 14).

Builds (or reuses: a profile's id is derived from model, corpus and settings) a `topk` profile of
minilm over the built-in calibration text and of demo-lm over its held-out split, then reads the
profiles back through the reader (sam_viz.profile.open_profile -> hot_curve, layer_table) and writes:

- docs/profiles/<model>_hot.png: PowerInfer's Fig. 4 (Song et al. 2023: the share of neurons that
  covers X% of all activations), per layer and model-wide, next to the dead and always-on counts;
- bench/results/profile_figures.json: per layer and model-wide, the share of neurons that covers
  50 / 80 / 95% of the oracle selections, dead and always-on neurons, tokens and wall time;
- README.md: the table between <!-- profile-figures:start --> and <!-- profile-figures:end -->.

    nice .venv/bin/python -m bench.profile_figures [--max-tokens 50000] [--density 0.1]
    .venv/bin/python -m bench.profile_figures --render       # PNGs and README from the stored profiles

Run from the repository root (the corpus paths are relative to it); profiles go to
SAM_VIZ_PROFILE_DIR (default ./profiles).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sam_viz.profile import build_profile, open_profile

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "profiles"
RESULTS = ROOT / "bench" / "results" / "profile_figures.json"
README = ROOT / "README.md"
START, END = "<!-- profile-figures:start -->", "<!-- profile-figures:end -->"
RUNS = (("minilm", "builtin:calibration"), ("demo-lm", "models/demo/heldout.txt"))
COVERS = (0.5, 0.8, 0.95)
COMMAND = "nice .venv/bin/python -m bench.profile_figures --max-tokens {max_tokens} --density {density:g}"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build(spec: str, source: str, density: float, max_tokens: int) -> dict:
    """The manifest of the topk profile of `spec` over `source` (built now, or found)."""
    def progress(done: int, total: int, message: str) -> None:
        say(f"{spec}: {done:,}/{total:,} tokens, {message}")
    start = time.perf_counter()
    manifest = build_profile(spec, source, policy="topk", density=density, max_tokens=max_tokens, progress=progress)
    say(f"{spec}: profile {manifest['id']}, {manifest['tokens']:,} tokens ({time.perf_counter() - start:.1f} s here)")
    return manifest


def coverage(curve) -> dict:
    """Shares of neurons that cover 50 / 80 / 95% of the selections, and the share of the selections
    that the hottest 10% of the neurons cover (what a static set at density 0.1 could keep at best)."""
    hot10 = float(curve.selections[round(0.1 * (len(curve.units) - 1))])
    return {**{f"cover{round(c * 100)}": round(curve.covering(c), 4) for c in COVERS}, "hot10": round(hot10, 4)}


def numbers(profile, source: str) -> dict:
    """What the README and the figures show of one profile, read through the reader."""
    table = profile.layer_table()
    layers = [{"layer": int(r.layer), **coverage(profile.hot_curve(int(r.layer))), "dead": int(r.dead),
               "always_on": int(r.always_on), "recall": round(float(r.recall), 4)} for r in table.itertuples()]
    m = profile.manifest
    return {"profile": profile.id, "corpus": source, "tokens": int(m["tokens"]), "wall_s": round(float(m["wall_s"]), 1),
            "policy": m["settings"]["policy"], "density": m["settings"]["density"],
            "neurons_per_layer": profile.units, "n_layers": profile.n_layers,
            "model_wide": {**coverage(profile.hot_curve()), "dead": sum(r["dead"] for r in layers),
                           "always_on": sum(r["always_on"] for r in layers)},
            "layers": layers}


def draw_png(profile, model: str, row: dict, path: Path) -> None:
    """Hot-neuron curves (left) and dead / always-on counts per layer (right), matplotlib Agg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=90, gridspec_kw={"width_ratios": [3, 2]})
    cmap = plt.get_cmap("viridis")
    for layer in range(profile.n_layers):
        c = profile.hot_curve(layer)
        ax.plot(c.units, c.selections, lw=1, color=cmap(layer / max(1, profile.n_layers - 1)), label=f"layer {layer}")
    c = profile.hot_curve()
    ax.plot(c.units, c.selections, lw=2.2, color="black", label="model-wide")
    ax.plot([0, 1], [0, 1], ls=":", lw=1, color="grey", label="every neuron alike")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="share of neurons (hottest first)",
           ylabel="share of oracle selections covered",
           title=f"{model}: hot neurons ({row['tokens']:,} tokens, topk {row['density']:g})")
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    layers = [r["layer"] for r in row["layers"]]
    width = 0.4
    bx.bar([x - width / 2 for x in layers], [r["dead"] for r in row["layers"]], width, label="dead (never selected)",
           color="#4a6f96")
    bx.bar([x + width / 2 for x in layers], [r["always_on"] for r in row["layers"]], width,
           label="always on (every token)", color="#d95f02")
    bx.set(xlabel="layer", ylabel=f"neurons (of {profile.units:,} per layer)", title="dead and always-on neurons",
           xticks=layers)
    bx.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def pct(x: float) -> str:
    return f"{x:.1%}"


def readme_block(results: dict) -> str:
    """The README's runs and table, written from the JSON."""
    lines = [START, "", f"Regenerate: `{results['command']}` (redraw the PNGs and this table from the stored "
             "profiles: `--render`).", ""]
    for model, row in results["models"].items():
        wide = row["model_wide"]
        lines.append(f"- **{model}** over `{row['corpus']}`: {row['tokens']:,} tokens, {row['n_layers']} layers x "
                     f"{row['neurons_per_layer']:,} neurons, {row['policy']} {row['density']:g}, profile "
                     f"`{row['profile']}` built in {row['wall_s']:.0f} s; model-wide {pct(wide['cover80'])} of the "
                     f"neurons cover 80% of the selections, {wide['dead']} neurons are dead "
                     f"({pct(wide['dead'] / (row['n_layers'] * row['neurons_per_layer']))}), {wide['always_on']} "
                     "always on.")
    lines += ["", "| model | layer | neurons covering 50% / 80% / 95% of selections | selections covered by the "
              "hottest 10% | dead | always on |", "|---|---|---|---|---|---|"]
    for model, row in results["models"].items():
        for r in [*row["layers"], {"layer": "all", **row["model_wide"]}]:
            lines.append(f"| {model} | {r['layer']} | {pct(r['cover50'])} / {pct(r['cover80'])} / "
                         f"{pct(r['cover95'])} | {pct(r['hot10'])} | {r['dead']} | {r['always_on']} |")
    lines += ["", *[f"![{m}: hot-neuron curves and dead / always-on neurons per layer](docs/profiles/{m}_hot.png)"
                    for m in results["models"]], "", END]
    return "\n".join(lines)


def write_readme(results: dict) -> None:
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"error: README.md lacks the {START} ... {END} markers")
    head, rest = text.split(START, 1)
    README.write_text(head + readme_block(results) + rest.split(END, 1)[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-tokens", type=int, default=50_000, help="cap per profile (whole contexts)")
    ap.add_argument("--density", type=float, default=0.1, help="topk density of the profiles")
    ap.add_argument("--render", action="store_true", help="only redraw the PNGs and README from the JSON's profiles")
    args = ap.parse_args(argv)
    if args.render:
        results = json.loads(RESULTS.read_text())
        profiles = {m: open_profile(row["profile"]) for m, row in results["models"].items()}
    else:
        profiles = {spec: open_profile(build(spec, source, args.density, args.max_tokens)["id"]) for spec, source in RUNS}
        results = {"command": COMMAND.format(max_tokens=args.max_tokens, density=args.density),
                   "models": {spec: numbers(profiles[spec], source) for spec, source in RUNS}}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    for model, profile in profiles.items():
        draw_png(profile, model, results["models"][model], DOCS / f"{model}_hot.png")
    write_readme(results)
    say(f"wrote {RESULTS.relative_to(ROOT)}, docs/profiles/*.png and README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
