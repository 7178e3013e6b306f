"""The seed's claim measured on the demo LMs: "comparable accuracy at under half the compute", with
dynamic sparsity beating static. Held-out perplexity (sam_viz.evaluate, exactly `eval`) of
`demo-lm` (trained with top-k MLP sparsity at 0.1) and its dense twin `demo-lm-dense` under every
policy, post-hoc on the twin, and a perplexity-vs-density curve, as the quality-vs-sparsity tables
of Deja Vu, CATS, TEAL and ProSparse; with each row's MLP FLOPs and weight bytes per token
(sam_viz.cost) and the one command that reproduces it.

`measure_claims` computes the rows (bench/demo_claims.py runs it and adds the decode benchmark),
`read_claims` reads models/demo/claims.json back validated and bounded (the app page), `verdict`
says how far the claim holds against the issue's bar, and `table_rows` / `markdown_table` render it.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sam_viz.models import LoadedModel
from sam_viz.models.loading import DEMO_DIR
from sam_viz.sparse_ops import POLICIES, get_calibration
from sam_viz.sparse_ops.mlp import install

from .cost import neuron_cost
from .evaluate import EvalSpec, Evaluation, evaluate

SPARSE, DENSE = "demo-lm", "demo-lm-dense"
TRAINED_DENSITY = 0.1
CURVE = (0.05, 0.1, 0.25, 0.5)
SPARSE_POLICIES = ("topk", "threshold", "predictor", "static")
SAVES_WORK = {                            # policies that read fewer MLP weights than dense (topk needs all of h)
    "threshold": "reads every gate row to choose, then only the chosen rows of up and down",
    "predictor": "chooses before reading any MLP weight",
    "static": "chooses before reading any MLP weight",
}
BAR_RATIO, BAR_DENSITY = 1.15, 0.15      # the bar: within 15% of dense at <= 15% of neurons
CLAIMS = DEMO_DIR / "claims.json"
FORMAT = "sam-viz-claims/1"
MAX_BYTES, MAX_ROWS = 1 << 20, 200
GROUPS = {"baseline": "dense twin", "all-neurons": "demo-lm, every neuron",
          "trained": "demo-lm at its trained density", "post-hoc": "dense twin, post-hoc",
          "curve": "curve (topk)"}
ROW_NUMBERS = ("density", "perplexity", "loss", "mlp_density", "mlp_flops", "mlp_bytes",
               "dense_mlp_flops", "dense_mlp_bytes", "model_ratio")
FACTS = ("d_model", "d_ff", "layers", "bytes_per_param", "other_params")
PAGE_COLUMNS = ("part", "model", "policy", "density", "perplexity", "vs dense twin", "MLP FLOPs vs dense",
                "MLP neurons computed", "MLP MFLOPs/token", "MLP weight MB/token", "command")   # the page's order
DECODE_NUMBERS = ("density", "dense_tok_s", "sparse_tok_s", "speedup", "ideal_speedup", "share_of_ideal", "f_mlp")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Setting:
    """One measured row: a model under a policy at a density, and the parts of the claim it serves."""
    model: str
    policy: str
    density: float
    groups: tuple[str, ...]

    def command(self, max_tokens: int | None) -> str:
        """The one line that reproduces this row's perplexity."""
        density = "" if self.policy == "dense" else f" --density {self.density:g}"
        limit = "" if max_tokens is None else f" --max-tokens {max_tokens}"
        return f"python -m sam_viz eval --model {self.model} --policy {self.policy}{density}{limit} --json"


def plan(trained: float = TRAINED_DENSITY, curve=CURVE) -> list[Setting]:
    """Every setting the claim needs, each once (a setting in two parts of the claim lists both)."""
    wanted = [(DENSE, "dense", 1.0, "baseline"), (SPARSE, "dense", 1.0, "all-neurons")]
    wanted += [(SPARSE, p, trained, "trained") for p in SPARSE_POLICIES]
    wanted += [(DENSE, p, trained, "post-hoc") for p in SPARSE_POLICIES]
    wanted += [(m, "topk", d, "curve") for m in (SPARSE, DENSE) for d in curve]
    groups: dict[tuple, list[str]] = {}
    for model, policy, density, group in wanted:
        groups.setdefault((model, policy, density), []).append(group)
    return [Setting(*key, tuple(g)) for key, g in groups.items()]


def model_facts(loaded: LoadedModel) -> dict:
    """What the cost model needs of an architecture: widths, GLU or not, bytes per weight as
    loaded, and the other matrix weights a token reads (attention projections, the LM head)."""
    mlp = {id(p) for w in install(loaded) for p in w.parameters()}
    params = list(loaded.model.parameters())
    adapter = loaded.adapter
    return {"d_model": loaded.model.config.hidden_size, "d_ff": loaded.d_ff, "layers": loaded.n_layers,
            "glu": adapter.up is not None or adapter.gate_up is not None or adapter.is_moe,
            "bytes_per_param": params[0].element_size(),
            "other_params": sum(p.numel() for p in params if p.dim() == 2 and id(p) not in mlp)}


def row_cost(loaded: LoadedModel, result: Evaluation, facts: dict) -> dict:
    """MLP FLOPs and weight bytes per token of an evaluation (sam_viz.cost, predictor included), and
    the whole model's matrix-weight work per token relative to dense (`model_ratio`)."""
    policy, (selected, possible) = result.spec.policy, result.neurons
    params = calls = 0
    if policy == "predictor" and result.spec.density < 1:
        cal = get_calibration(loaded, train=False)
        params = cal.predictor_cost(next(iter(cal.predictors)))[1]
        calls = loaded.n_layers * max(1, loaded.experts_per_token)
    c = neuron_cost(possible / result.tokens, selected / result.tokens, policy, facts["d_model"], facts["glu"],
                    params, calls, facts["bytes_per_param"])
    other = facts["other_params"]
    return {"mlp_flops": c["sparse_flops"], "mlp_bytes": c["sparse_bytes"], "dense_mlp_flops": c["dense_flops"],
            "dense_mlp_bytes": c["dense_bytes"],
            "model_ratio": (other + c["sparse_params"]) / (other + c["dense_params"])}


def measure(loaded: LoadedModel, setting: Setting, max_tokens: int | None, text: str | None = None,
            progress: Progress | None = None) -> dict:
    """One row: `eval` of the setting on the held-out split (or `text`), with its cost and command."""
    say = progress or (lambda line: None)
    spec = EvalSpec(model=setting.model, policy=setting.policy, density=setting.density, max_tokens=max_tokens)
    t0 = time.perf_counter()
    result = evaluate(loaded, spec, text,
                      calibrating=lambda frac, line: say(f"{setting.model} {setting.policy}: {line}"))
    row = {"model": setting.model, "policy": setting.policy, "density": spec.density, "groups": list(setting.groups),
           "perplexity": result.perplexity, "loss": result.loss, "tokens": result.tokens,
           "mlp_density": result.mlp_density, **row_cost(loaded, result, model_facts(loaded)),
           "seconds": round(time.perf_counter() - t0, 1), "command": setting.command(max_tokens)}
    say(f"{setting.model:14} {setting.policy:9} {spec.density:<5g} perplexity {row['perplexity']:9.3f}  "
        f"mlp_density {row['mlp_density']:.4f}  ({row['seconds']:.0f} s)")
    return row


def weights_digest(model: str) -> str:
    """sha256 (first 16 hex digits) of a demo model's shipped weights: claims.json names the weights it measured."""
    return hashlib.sha256((DEMO_DIR / model / "model.safetensors").read_bytes()).hexdigest()[:16]


def measure_claims(load: Callable[[str], LoadedModel], max_tokens: int | None = None, settings=None,
                   text: str | None = None, progress: Progress | None = None) -> dict:
    """Every row of the claim (plan() unless `settings`), in claims.json's shape without `decode`."""
    settings = plan() if settings is None else settings
    rows = [measure(load(s.model), s, max_tokens, text, progress) for s in settings]
    models = sorted({s.model for s in settings})
    return {"format": FORMAT, "text": "models/demo/heldout.txt" if text is None else "given text",
            "context": EvalSpec().context, "max_tokens": max_tokens, "trained_density": TRAINED_DENSITY,
            "bar": {"perplexity_ratio": BAR_RATIO, "density": BAR_DENSITY},
            "weights": {m: weights_digest(m) for m in models if m in (SPARSE, DENSE)},
            "model": model_facts(load(models[0])), "rows": rows, "decode": []}


# ------------------------------------------------------------------------------ reading and verdict

def _number(value, low: float = 0.0, high: float = math.inf) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and low <= value <= high else None


def _valid_row(r) -> dict | None:
    if not isinstance(r, dict) or r.get("model") not in (SPARSE, DENSE) or r.get("policy") not in POLICIES:
        return None
    numbers = {k: _number(r.get(k)) for k in ROW_NUMBERS}
    if None in numbers.values() or not 0 < numbers["density"] <= 1 or not numbers["perplexity"] > 0:
        return None
    command = str(r.get("command", ""))[:200]
    groups = [g for g in r.get("groups", []) if g in GROUPS] if isinstance(r.get("groups"), list) else []
    tokens = _number(r.get("tokens"), 1)
    return {"model": r["model"], "policy": r["policy"], **numbers, "groups": groups,
            "tokens": int(tokens or 0), "command": command if command.startswith("python -m sam_viz eval ") else ""}


def _valid_decode(r) -> dict | None:
    if not isinstance(r, dict) or r.get("policy") not in POLICIES:
        return None
    numbers = {k: _number(r.get(k)) for k in DECODE_NUMBERS}
    if None in numbers.values() or not 0 < numbers["density"] <= 1:
        return None
    return {"model": str(r.get("model", ""))[:40], "policy": r["policy"], "kernel": str(r.get("kernel", ""))[:20],
            **numbers, "threads": int(_number(r.get("threads"), 0, 1024) or 0),
            "command": str(r.get("command", ""))[:200]}


def parse_claims(data: str | bytes) -> dict:
    """claims.json validated and bounded: rows that are not well formed are dropped (`dropped` counts
    them). ValueError with one sentence for a file that is not a claims file."""
    if len(data) > MAX_BYTES:
        raise ValueError(f"the claims file is {len(data):,} bytes; the limit is {MAX_BYTES:,}")
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the claims file is not JSON") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or not isinstance(raw.get("rows"), list):
        raise ValueError(f"the claims file is not in the {FORMAT} format")
    rows = [r for r in map(_valid_row, raw["rows"][:MAX_ROWS]) if r]
    decode = raw.get("decode") if isinstance(raw.get("decode"), list) else []
    kept_decode = [r for r in map(_valid_decode, decode[:MAX_ROWS]) if r]
    max_tokens, threads = _number(raw.get("max_tokens"), 1), _number(raw.get("threads"), 1, 1024)
    weights = raw.get("weights") if isinstance(raw.get("weights"), dict) else {}
    facts = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    return {"rows": rows, "decode": kept_decode,
            "dropped": len(raw["rows"]) - len(rows) + len(decode) - len(kept_decode),
            "max_tokens": int(max_tokens) if max_tokens else None,
            "trained_density": _number(raw.get("trained_density"), 0, 1) or TRAINED_DENSITY,
            "weights": {str(k)[:40]: str(v)[:64] for k, v in list(weights.items())[:4]},
            "model": {k: int(_number(facts.get(k), 0, 1e12) or 0) for k in FACTS},
            "seconds": _number(raw.get("seconds"), 0, 1e7), "threads": int(threads) if threads else None}


def read_claims(path: Path | None = None) -> dict | None:
    """The claims at `path` (default: the shipped models/demo/claims.json) through parse_claims, or
    None when there is no claims file yet."""
    path = CLAIMS if path is None else path
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"the claims file is over {MAX_BYTES:,} bytes")
        return parse_claims(path.read_bytes())
    except FileNotFoundError:
        return None


def stale(claims: dict) -> list[str]:
    """The demo models whose shipped weights are not the ones the claims measured."""
    return [m for m, digest in claims["weights"].items()
            if m in (SPARSE, DENSE) and (DEMO_DIR / m / "model.safetensors").is_file() and weights_digest(m) != digest]


def find(claims: dict, model: str, policy: str, density: float = 1.0) -> dict | None:
    for r in claims["rows"]:
        if r["model"] == model and r["policy"] == policy and (policy == "dense" or abs(r["density"] - density) < 1e-9):
            return r
    return None


def verdict(claims: dict) -> dict:
    """How far the claim holds: per policy at the trained density, demo-lm's perplexity relative to
    the dense twin's, the neurons and MLP FLOPs it computes, whether it meets the bar, and how much
    each model loses to that policy against its own every-neuron perplexity; and plain sentences
    computed from those numbers."""
    base, d = find(claims, DENSE, "dense"), claims["trained_density"]
    if base is None:
        return {"policies": {}, "sentence": "The claims file has no dense-twin row, so nothing can be compared."}
    own = {m: find(claims, m, "dense") for m in (SPARSE, DENSE)}
    out = {}
    for p in SPARSE_POLICIES:
        r, twin = find(claims, SPARSE, p, d), find(claims, DENSE, p, d)
        if r is None:
            continue
        ratio, flops = r["perplexity"] / base["perplexity"], r["mlp_flops"] / r["dense_mlp_flops"]
        out[p] = {"perplexity": r["perplexity"], "ratio": ratio, "mlp_density": r["mlp_density"],
                  "flops_ratio": flops, "model_ratio": r["model_ratio"],
                  "meets_bar": ratio <= BAR_RATIO and r["mlp_density"] <= BAR_DENSITY,
                  "loss_vs_own_dense": r["perplexity"] / own[SPARSE]["perplexity"] if own[SPARSE] else None,
                  "twin_loss_vs_dense": twin["perplexity"] / base["perplexity"] if twin else None}
    return {"dense_perplexity": base["perplexity"], "policies": out, "sentence": _sentence(base, d, out)}


def summary(claims: dict) -> list[str]:
    """The verdict in three lines (markdown), each computed from verdict()'s numbers: whether the
    claim holds and with which policy, what the oracle topk costs, and dynamic vs static."""
    v, d = verdict(claims), claims["trained_density"]
    p = v["policies"]
    if not p:
        return [v["sentence"]]
    cheap = {k: r for k, r in p.items() if k in SAVES_WORK}
    holds = [k for k, r in cheap.items() if r["ratio"] <= BAR_RATIO and r["flops_ratio"] < 0.5]
    each = [f"{k}: {_pct(cheap[k]['ratio'])} perplexity at {cheap[k]['flops_ratio']:.0%} of the dense MLP FLOPs"
            for k in holds]
    claim = ("**Claim holds** for the MLPs with " + ", ".join(each) if holds
             else "**Claim does not hold** for any policy that saves work at inference")
    lines = [claim + f" (bar: within {BAR_RATIO - 1:.0%} of the dense twin, under half the compute)."]
    if "topk" in p:
        t = p["topk"]
        lines.append(f"**Oracle topk** at {d:g}: {_pct(t['ratio'])} perplexity, but {t['flops_ratio']:.0%} of the "
                     "dense MLP FLOPs: it computes every neuron to choose.")
    if "predictor" in p and "static" in p:
        dyn, sta = p["predictor"]["perplexity"], p["static"]["perplexity"]
        lines.append(f"**Dynamic vs static** at {d:g}: predictor {dyn:.2f}, static {sta:.2f} perplexity: dynamic "
                     f"{'beats' if dyn < sta else 'does not beat'} static.")
    return lines


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def _sentence(base: dict, density: float, v: dict) -> str:
    parts = [f"The dense twin's held-out perplexity is {base['perplexity']:.2f}."]
    if "topk" in v:
        t = v["topk"]
        parts.append(f"demo-lm with topk at its trained density {density:g} reaches {t['perplexity']:.2f} "
                     f"({_pct(t['ratio'])}) computing {t['mlp_density']:.1%} of the MLP neurons, so it "
                     f"{'meets' if t['meets_bar'] else 'misses'} the bar (within {BAR_RATIO - 1:.0%} of dense at "
                     f"<= {BAR_DENSITY:.0%} of the neurons); but topk must compute every h to choose, so it "
                     f"still costs {t['flops_ratio']:.0%} of the dense MLP FLOPs.")
        if t["loss_vs_own_dense"] is not None and t["twin_loss_vs_dense"] is not None:
            less = t["loss_vs_own_dense"] < t["twin_loss_vs_dense"]
            parts.append(f"Against its own every-neuron perplexity, demo-lm under topk {density:g} changes by "
                         f"{_pct(t['loss_vs_own_dense'])} and the dense twin under the same post-hoc topk by "
                         f"{_pct(t['twin_loss_vs_dense'])}: the sparse-trained model degrades "
                         f"{'less' if less else 'more'} than its twin.")
    cheap = [(p, v[p]) for p in SAVES_WORK if p in v]
    parts += [f"With {p} ({SAVES_WORK[p]}): {r['perplexity']:.2f} ({_pct(r['ratio'])}) at "
              f"{r['flops_ratio']:.0%} of the dense MLP FLOPs ({r['model_ratio']:.0%} of the whole model's "
              "matrix work per token)." for p, r in cheap]
    if "predictor" in v and "static" in v:
        beats = v["predictor"]["perplexity"] < v["static"]["perplexity"]
        parts.append(f"Dynamic vs static at the same density: predictor {v['predictor']['perplexity']:.2f}, static "
                     f"{v['static']['perplexity']:.2f}: dynamic {'beats' if beats else 'does not beat'} static here.")
    holds = [p for p, r in cheap if r["ratio"] <= BAR_RATIO and r["flops_ratio"] < 0.5]
    claim = "So at this scale \"comparable accuracy at under half the compute\""
    if holds:
        parts.append(f"{claim} holds for the MLPs with " + " and ".join(
            f"{p} ({v[p]['flops_ratio']:.0%} of their FLOPs; {v[p]['model_ratio']:.0%} of the whole model's matrix "
            "work)" for p in holds) + ".")
    elif v.get("topk", {}).get("meets_bar"):
        parts.append(f"{claim} holds only for the oracle topk, which saves no compute at inference; not for a "
                     "policy that does.")
    else:
        parts.append(f"{claim} does not hold.")
    return " ".join(parts)


def table_rows(claims: dict) -> list[dict]:
    """The claims table, one dict per row, columns in display order."""
    base = find(claims, DENSE, "dense")
    return [{"part": ", ".join(GROUPS[g] for g in r["groups"]), "model": r["model"], "policy": r["policy"],
             "density": r["density"], "perplexity": round(r["perplexity"], 3),
             "vs dense twin": _pct(r["perplexity"] / base["perplexity"]) if base else "",
             "MLP neurons computed": f"{r['mlp_density']:.1%}",
             "MLP MFLOPs/token": round(r["mlp_flops"] / 1e6, 3), "MLP weight MB/token": round(r["mlp_bytes"] / 1e6, 3),
             "MLP FLOPs vs dense": f"{r['mlp_flops'] / r['dense_mlp_flops']:.0%}", "command": r["command"]}
            for r in claims["rows"]]


def markdown_table(claims: dict) -> str:
    rows = table_rows(claims)
    if not rows:
        return "(no rows)"
    head = list(rows[0])
    cell = lambda k, v: f"`{v}`" if k == "command" else (f"{v:g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in head) + " |" for r in rows]
    return "\n".join(lines)


def decode_table(claims: dict) -> list[dict]:
    """The decode benchmark rows for display: dense vs sparse tokens/s and the share of the ideal."""
    return [{"model": r["model"], "policy": r["policy"], "density": r["density"], "kernel": r["kernel"],
             "dense tok/s": round(r["dense_tok_s"], 1), "sparse tok/s": round(r["sparse_tok_s"], 1),
             "speedup": round(r["speedup"], 2), "ideal (Amdahl)": round(r["ideal_speedup"], 2),
             "share of ideal": f"{r['share_of_ideal']:.0%}", "f_mlp": round(r["f_mlp"], 3), "threads": r["threads"]}
            for r in claims["decode"]]


def report_markdown(claims: dict) -> str:
    """The claims table, the decode benchmark and the verdict, as markdown (README, model cards)."""
    tokens = {r["tokens"] for r in claims["rows"]}
    scope = (f"the first {claims['max_tokens']:,} tokens (whole windows: {min(tokens):,} predicted tokens)"
             if claims["max_tokens"] else f"all of it ({', '.join(f'{t:,}' for t in sorted(tokens))} predicted tokens)")
    out = [f"Held-out perplexity on `models/demo/heldout.txt`, {scope}; each row reproduces with its command. "
           "MLP FLOPs and weight bytes are per token as a batch-1 decoder pays them (sam_viz/cost.py), "
           f"{claims['model']['bytes_per_param']} bytes per weight as eval loads them; topk and threshold must "
           "read weights to choose, so they save less than their density."
           + (f" The whole run took {claims['seconds'] / 60:.1f} min with {claims['threads']} torch thread(s)."
              if claims["seconds"] and claims["threads"] else ""), "", markdown_table(claims)]
    decode = decode_table(claims)
    if decode:
        head = list(decode[0])
        out += ["", "Decode speed (batch 1, greedy, KV cache, `cpu` kernel; ideal = 1 / (f_other + f_mlp x density), "
                "f_mlp = the MLPs' measured share of a dense step):", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in decode]
    return "\n".join(out + ["", verdict(claims)["sentence"]])
