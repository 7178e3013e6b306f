"""Model cards of the demo LMs (models/demo/demo-lm/README.md, models/demo/demo-lm-dense/README.md) and
their loss curves (models/demo/loss_curves.png), written from the training outputs and the measured
claims, never typed by hand (the layout of Hugging Face model cards: data, tokenizer, architecture,
training, evaluation, samples).

    python -m tools.model_card --train-dir DIR   # copy DIR's outputs to models/demo/training/, write cards
    python -m tools.model_card                   # write the cards from models/demo/training/ again

DIR is a tools/train_demo.py output folder: results.json (both models and the data counts),
runs/{dense,sparse}/curves.json and data/manifest.json. The copy keeps the manifest's counts, split
rule and held-out file list (not the 472 training file names). The claims table and verdict come
from models/demo/claims.json (python -m bench.demo_claims).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from sam_viz.models.loading import DEMO_DIR
from sam_viz import claims as cl

TRAINING = DEMO_DIR / "training"
PNG = DEMO_DIR / "loss_curves.png"
VARIANTS = {"dense": cl.DENSE, "sparse": cl.SPARSE}
COLOURS = {"dense": "#1f77b4", "sparse": "#ff7f0e"}


def copy_training(train_dir: Path, out: Path = TRAINING) -> None:
    """The training outputs the cards need, into the repository (small JSON files)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((train_dir / "data" / "manifest.json").read_text())
    manifest["train"].pop("files", None)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    results = json.loads((train_dir / "results.json").read_text())
    for name in VARIANTS.values():
        results[name].pop("export", None)                  # a path on the training machine
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for variant in VARIANTS:
        curves = json.loads((train_dir / "runs" / variant / "curves.json").read_text())
        (out / f"curves-{variant}.json").write_text(json.dumps(curves) + "\n")


def load_training(folder: Path = TRAINING) -> tuple[dict, dict, dict]:
    """(manifest, results, {variant: curves}) from a copy made by copy_training."""
    read = lambda name: json.loads((folder / name).read_text())  # noqa: E731
    return read("manifest.json"), read("results.json"), {v: read(f"curves-{v}.json") for v in VARIANTS}


def draw_loss_curves(curves: dict, path: Path = PNG) -> None:
    """Train loss and held-out loss vs step, both models; demo-lm's held-out loss also with every neuron."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for variant, c in curves.items():
        name, colour = VARIANTS[variant], COLOURS[variant]
        ax.plot([r["step"] for r in c["train"]], [r["loss"] for r in c["train"]], color=colour, alpha=0.45,
                lw=1, label=f"{name}: train")
        ax.plot([r["step"] for r in c["heldout"]], [r["loss"] for r in c["heldout"]], "o-", color=colour,
                ms=3, label=f"{name}: held-out" + (" (at its training density)" if variant == "sparse" else ""))
        if variant == "sparse":
            ax.plot([r["step"] for r in c["heldout"]], [r.get("loss_dense", r["loss"]) for r in c["heldout"]],
                    "s--", color=colour, ms=3, lw=1, label=f"{name}: held-out, every neuron")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title="Training and held-out loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fence(text: str) -> str:
    """A fenced block that shows `text` literally, whatever backtick runs it holds."""
    ticks = "`" * max(3, 1 + max(map(len, re.findall(r"`+", text)), default=0))
    return f"{ticks}text\n{text}\n{ticks}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h ({seconds / 60:.0f} min)"


def data_section(manifest: dict) -> list[str]:
    rows = [f"| {split} | {manifest[split]['documents']:,} | {manifest[split]['words']:,} | "
            f"{manifest[split]['bytes']:,} | {manifest[split]['tokens']:,} |" for split in ("train", "test")]
    held = manifest["test"].get("files", [])
    return ["## Data", "",
            f"- Source: the reStructuredText sources of the Python 3.11 documentation, `{manifest['source']}` "
            "(Debian's `python3.11-doc`; see `../README.md`). One file is one document.",
            f"- Licence: {manifest['licence']} (`../LICENSE-DATA.txt`).",
            f"- Split, by document: {manifest['split_rule']}. No training step sees the test split; "
            "`../heldout.txt` is the test split, documents joined by `<|endoftext|>`.",
            f"- Dropped documents: {len(manifest.get('dropped', []))}.", "",
            "| split | documents | words | bytes | tokens |", "|---|---|---|---|---|", *rows, "",
            f"Held-out documents: {', '.join(f'`{f}`' for f in held)}." if held else ""]


def architecture_section(config: dict, manifest: dict) -> list[str]:
    return ["## Tokenizer and architecture", "",
            f"- Tokenizer: byte-level BPE trained with the `tokenizers` package on the train split only, "
            f"vocabulary {manifest['vocab_size']:,}; one special token `<|endoftext|>` (bos = eos = pad = unk), "
            "put before each document in training and before a prompt by `load_model`; `tokenizer.json`.",
            f"- `{config['architectures'][0]}` ({config['model_type']}): d_model {config['hidden_size']}, "
            f"{config['num_hidden_layers']} layers, {config['num_attention_heads']} heads, MLP d_ff "
            f"{config['intermediate_size']} ({'SwiGLU' if config['hidden_act'] == 'silu' else config['hidden_act']}), "
            f"{'tied' if config['tie_word_embeddings'] else 'separate'} input and output embeddings, max positions "
            f"{config['max_position_embeddings']}; weights in "
            f"{config.get('dtype', config.get('torch_dtype'))} safetensors."]


def training_section(r: dict) -> list[str]:
    c = r["config"]
    lines = ["## Training", "",
             f"- `python -m tools.train_demo --out DIR --steps {r['steps']} --warmup {c['warmup']}` "
             f"(tools/train_demo.py; it prepares the data and tokenizer into DIR first, then trains both models): "
             f"{r['steps']:,} steps of {c['batch']} windows of "
             f"{c['context']} tokens, {r['tokens_seen']:,} tokens seen; AdamW (lr {c['lr']:g}, "
             f"warmup {c['warmup']} steps "
             f"then cosine to 10%, weight decay {c['weight_decay']:g}, beta2 {c['beta2']:g}, clip {c['clip']:g}), "
             f"seed {c['seed']}, on CPU.",
             f"- Wall time: {_hours(r['wall_time_s'])} of training time (evaluation pauses excluded), with both "
             "models training at once on a shared 2-core machine, one torch thread each, beside other work; "
             "when the two had the machine to themselves they ran at about 2,100 (dense) and 1,900 (sparse) "
             "tokens/s each, that is 40-45 minutes for these 5.12M tokens. Final train loss (mean of "
             "the last logged points): "
             f"{r['final_train_loss']:.3f}."]
    if r["variant"] == "sparse":
        lines.append(f"- MLP sparsity in the loop: per token, only the round({c['density']:g} x {c['d_ff']}) neurons "
                     "with the largest |h| (h = silu(W_gate x) * (W_up x)) pass to the down projection (the "
                     "app's `topk`); dense for the first 5% of the steps, then the density is annealed from 1 "
                     f"to {c['density']:g} (linearly in log space) by 30% of the steps.")
    else:
        lines.append("- Dense: every MLP neuron, the same initial weights, tokens and schedule as demo-lm.")
    return lines + ["", "![training and held-out loss](../loss_curves.png)", "",
                    f"Train loss: the mean over each {c['log_every']} steps. Held-out points: the loss on "
                    f"{c['eval_windows']} "
                    f"fixed held-out windows at each checkpoint (every {c['ckpt_minutes']:g} minutes of training)."]


def evaluation_section(r: dict, claims: dict | None) -> list[str]:
    lines = ["## Held-out perplexity", "",
             f"At the end of training (fp32 weights, all {r['heldout_windows']:,} held-out windows, "
             f"{r['heldout_tokens']:,} predicted tokens): "
             + "; ".join(f"{label.replace('_', ' at ')}: {v['perplexity']:.3f}" for label, v in r["heldout"].items())
             + ". The shipped fp16 weights, measured by `eval`:", ""]
    if claims is None:
        return lines + ["(not measured yet: `python -m bench.demo_claims`)"]
    return lines + [cl.report_markdown(claims)]


def samples_section(results: dict) -> list[str]:
    sparse = results[cl.SPARSE]
    label = next(k for k in sparse["continuations"] if k != "dense")
    runs = [(f"{cl.DENSE}", results[cl.DENSE]["continuations"]["dense"]),
            (f"{cl.SPARSE} ({label.replace('_', ' at ')}, its trained density)", sparse["continuations"][label])]
    lines = ["## Continuations at the start of a document", "",
             "Greedy, 40 tokens at most, by the training script's fp32 models (tools/train_demo.py `continuation`)."]
    for prompt in runs[0][1]:
        lines += ["", f"**{prompt}**", ""]
        for name, texts in runs:
            lines += [f"{name}:", "", _fence(prompt + texts[prompt]), ""]
    return lines


BODY_PROMPTS = ("The :func:`open` function returns a file object, which", "This module provides functions for",
                "If the file does not exist,", "   Return a new list containing", "   Raise a :exc:`ValueError` if")


def body_continuations(n_new: int = 30) -> list[dict]:
    """Greedy continuations of prompts written like the docs' body text (a short prompt at the start
    of a document reads as a title to these models, and they answer with a heading underline), by
    the shipped weights through the app's own path: demo-lm-dense, demo-lm-dense with top-k at 0.1
    applied after training, and demo-lm at its trained density 0.1."""
    from sam_viz import RunSpec, greedy_continuation, load_model

    dense, sparse = load_model(cl.DENSE), load_model(cl.SPARSE)
    rows = []
    for prompt in BODY_PROMPTS:
        twin = greedy_continuation(dense, RunSpec(prompt=prompt, model=cl.DENSE, policy="topk", density=0.1), n_new)
        own = greedy_continuation(sparse, RunSpec(prompt=prompt, model=cl.SPARSE, policy="topk", density=0.1), n_new)
        rows.append({"prompt": prompt, f"{cl.DENSE}": "".join(twin["dense"]),
                     f"{cl.DENSE}, top-k 0.1 after training": "".join(twin["sparse"]),
                     f"{cl.SPARSE}, top-k 0.1 (as trained)": "".join(own["sparse"])})
    return rows


def load_body(folder: Path = TRAINING) -> list[dict] | None:
    """The body-text continuations the cards were written with (None before the first run)."""
    path = folder / "body_continuations.json"
    return json.loads(path.read_text()) if path.is_file() else None


def body_section(rows: list[dict]) -> list[str]:
    lines = ["## Continuations of body text", "",
             "Greedy, 30 tokens, by the shipped fp16 weights through the app's own path "
             "(`sam_viz.greedy_continuation`, the continuation of the Dense vs sparse page)."]
    for row in rows:
        lines += ["", f"**{row['prompt'].strip()}**", ""]
        for name, text in row.items():
            if name != "prompt":
                lines += [f"{name}:", "", _fence(row["prompt"] + text), ""]
    return lines


def card(name: str, manifest: dict, results: dict, claims: dict | None, body: list[dict] | None = None) -> str:
    r = results[name]
    config = json.loads((DEMO_DIR / name / "config.json").read_text())
    what = (f"with top-k MLP sparsity in the loop: per token only the {r['config']['density']:.0%} of MLP neurons "
            "with the largest |h| are computed" if r["variant"] == "sparse" else
            "as the dense twin of demo-lm: every MLP neuron, the same data and schedule")
    head = [f"# {name}", "",
            "A small Llama-architecture causal LM trained in this repository on the Python 3.11 documentation, "
            f"{what}. "
            "A plain Hugging Face checkpoint: `AutoModelForCausalLM.from_pretrained` loads it, and so does "
            f"`load_model(\"{name}\")` (spec `{name}`). This card is written by `python -m tools.model_card` from "
            "the training outputs (`../training/`) and `../claims.json`; do not edit it by hand.", ""]
    body = [*data_section(manifest), "", *architecture_section(config, manifest), "", *training_section(r), "",
            *evaluation_section(r, claims), "", *(body_section(body) + [""] if body else []),
            *samples_section(results)]
    return "\n".join(head + body).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.model_card", description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-dir", type=Path, default=None, help="a tools/train_demo.py output folder to copy from")
    ap.add_argument("--all", action="store_true", help="write demo-lm-all's card only (from --train-dir's runs/all, "
                    "or models/demo/training/results-all.json and eval-all.json, measured when missing)")
    args = ap.parse_args(argv)
    if args.all:
        print(f"wrote {write_all_card(args.train_dir)}", file=sys.stderr)
        return 0
    if args.train_dir is not None:
        copy_training(args.train_dir)
    manifest, results, curves = load_training()
    draw_loss_curves(curves)
    claims = cl.read_claims()
    body = body_continuations()
    (TRAINING / "body_continuations.json").write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n")
    for name in VARIANTS.values():
        (DEMO_DIR / name / "README.md").write_text(card(name, manifest, results, claims, body), encoding="utf-8")
    print(f"wrote {PNG} and the cards of {', '.join(VARIANTS.values())}", file=sys.stderr)
    return 0



# ------------------------------------------------------------------ demo-lm-all (issue 23)

ALL = "demo-lm-all"
ALL_EVALS = (("topk", 0.4, "all"), ("dense", 1.0, "mlp"))          # (policy, density, scope) on the card
PREFIX_TOKENS = 4096                                                # the card's quick check: eval on a prefix


def all_evals(max_tokens: int | None = None) -> list[dict]:
    """`eval` of the shipped demo-lm-all weights (fp16 as shipped, computed in fp32), as the CLI prints it."""
    from sam_viz.evaluate import EvalSpec, evaluate
    from sam_viz.models import load_model

    loaded = load_model(ALL)
    return [evaluate(loaded, EvalSpec(model=ALL, policy=p, density=d, scope=s, max_tokens=max_tokens)).to_json()
            for p, d, s in ALL_EVALS]


def all_card(results: dict, evals: list[dict], prefix: list[dict]) -> str:
    """The card of demo-lm-all from its training results (tools/train_demo.py --variant all) and the
    shipped weights' `eval` rows (full held-out split, and the first PREFIX_TOKENS tokens)."""
    c = results["config"]
    row = {(e["policy"], e.get("scope", "mlp")): e for e in evals}
    quick = {(e["policy"], e.get("scope", "mlp")): e for e in prefix}
    sparse, dense = row[("topk", "all")], row[("dense", "mlp")]
    lines = [f"# {ALL}", "",
             "A small Llama-architecture causal LM trained in this repository on the Python 3.11 documentation "
             f"with top-k on the input of every linear projection (Q-Sparse style): per token, each of q, k, v, o, "
             f"gate, up and down reads only the {c['density']:.0%} of its input entries with the largest |x| "
             "(ties to the lower index), so at most that share of each block's matrix weights is read. "
             "A plain Hugging Face checkpoint: `AutoModelForCausalLM.from_pretrained` loads it, and so does "
             f"`load_model(\"{ALL}\")` (spec `{ALL}`). Run it as trained with `--scope all --policy topk "
             f"--density {c['density']:g}` (the app: Scope all, topk, {c['density']:g}). This card is written by "
             "`python -m tools.model_card --all` from `../training/results-all.json` and "
             "`../training/eval-all.json`; do not edit it by hand.", "",
             "## Data, tokenizer, architecture", "",
             "As demo-lm and demo-lm-dense (their cards): the same architecture (LlamaForCausalLM, d 256, 4 layers, "
             "4 heads, d_ff 1024, SwiGLU, tied embeddings, vocab 4096), the same tokenizer (loaded from demo-lm), "
             "the same split rule, initial weights (seed 0), data order (a function of seed and step) and schedule. "
             "One difference: the Python documentation installed here (Debian python3.11-doc 3.11.2-6+deb12u8) "
             "differs slightly from the one the two others trained on: its training split has 1,313,139 words "
             "(2,908,268 tokens) against 1,313,384 (2,908,747); the held-out split is the same 25 documents "
             "(191,329 tokens).", "",
             "## Training", "",
             f"- {results['steps']:,} steps of {c['batch']} x {c['context']} tokens, {results['tokens_seen']:,} "
             f"tokens seen; AdamW (lr {c['lr']:g}, warmup {c['warmup']} steps then cosine to 10%, weight decay "
             f"{c['weight_decay']:g}, beta2 {c['beta2']:g}, clip {c['clip']:g}), seed {c['seed']}, on CPU.",
             f"- Sparsity in the loop (tools/topk_all.py): dense for the first 5% of the steps, then the input "
             f"density of every projection is annealed from 1 to {c['density']:g} (linearly in log space) by 30% "
             "of the steps, as demo-lm's MLP density was. The backward pass is straight-through: the gradient "
             "with respect to x reaches every entry, W's gradient sees only the kept ones.",
             f"- Wall time: {results['wall_time_s'] / 3600:.1f} h of training time on a shared 2-core machine, "
             "one torch thread for most of it, beside other work (and 2 threads at 10x less speed for a while). "
             f"Final train loss: {results['final_train_loss']:.3f}.", "",
             "## Held-out perplexity", "",
             "At the end of training (fp32, all held-out windows): "
             + "; ".join(f"{label.replace('_', ' ')}: {v['perplexity']:.3f}" for label, v in results["heldout"].items())
             + ".", "",
             "The shipped fp16 weights through `eval` (full held-out split, models/demo/heldout.txt, windows of "
             "128 + 1 tokens):", "",
             "| command | perplexity | predicted tokens | whole-model matrix work |",
             "|---|---|---|---|"]
    for e, cmd in ((sparse, f"python -m sam_viz eval --model {ALL} --scope all --policy topk --density "
                            f"{c['density']:g} --json"),
                   (dense, f"python -m sam_viz eval --model {ALL} --policy dense --json")):
        work = e.get("model_density")
        lines.append(f"| `{cmd}` | {e['perplexity']:.4f} | {e['tokens']:,} | "
                     f"{'n/a' if work is None else f'{work:.1%}'} |")
    lines += ["", f"On the first {PREFIX_TOKENS:,} tokens (`--max-tokens {PREFIX_TOKENS}`), the check "
              "tests/test_demo_lm_all.py repeats: "
              + "; ".join(f"{p} ({s}): {e['perplexity']:.6f}" for (p, s), e in quick.items()) + ".", "",
              *_twin_line(sparse), "",
              "## Continuations at the start of a document", "",
              "Greedy, 40 tokens at most, by the training script's fp32 model (tools/train_demo.py `continuation`)."]
    for label, texts in results["continuations"].items():
        lines += ["", f"**{label.replace('_', ' ')}**", ""]
        for prompt, text in texts.items():
            lines += [_fence(prompt + text), ""]
    return "\n".join(lines).rstrip() + "\n"


def _twin_line(sparse: dict) -> list[str]:
    """demo-lm-all at its trained density against the dense twin's full-split perplexity (claims.json)."""
    base = cl.find(cl.read_claims(), cl.DENSE, "dense")
    if base is None:
        return ["Compare with demo-lm-dense (its card, and the claims table in ../README.md)."]
    ratio = sparse["perplexity"] / base["perplexity"] - 1
    verdict = "within" if ratio <= 0.05 else "not within"
    return [f"Against the dense twin (demo-lm-dense, every weight read: perplexity {base['perplexity']:.4f} in "
            f"../claims.json), demo-lm-all reading {sparse['model_density']:.1%} of the blocks' matrix weights "
            f"is {ratio:+.1%}: {verdict} the claim's 5%."]


def write_all_card(train_dir: Path | None = None) -> Path:
    if train_dir is not None:
        res = json.loads((train_dir / "runs" / "all" / "results.json").read_text())
        res.pop("export", None)
        (TRAINING / "results-all.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
        curves = json.loads((train_dir / "runs" / "all" / "curves.json").read_text())
        (TRAINING / "curves-all.json").write_text(json.dumps(curves) + "\n")
    results = json.loads((TRAINING / "results-all.json").read_text())
    path = TRAINING / "eval-all.json"
    if not path.is_file():
        path.write_text(json.dumps({"full": all_evals(), "prefix": all_evals(PREFIX_TOKENS)}, indent=1) + "\n")
    evals = json.loads(path.read_text())
    out = DEMO_DIR / ALL / "README.md"
    out.write_text(all_card(results, evals["full"], evals["prefix"]), encoding="utf-8")
    return out


if __name__ == "__main__":
    sys.exit(main())
