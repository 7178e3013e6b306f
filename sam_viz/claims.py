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
from sam_viz.sparse_ops import POLICIES, attention_weights, default_kernel, get_calibration
from sam_viz.sparse_ops.mlp import install

from .cost import mlp_scope_model_density, neuron_cost
from .evaluate import EvalSpec, Evaluation, evaluate

SPARSE, DENSE = "demo-lm", "demo-lm-dense"
TRAINED_DENSITY = 0.1
CURVE = (0.05, 0.1, 0.25, 0.5)
SPARSE_POLICIES = ("topk", "threshold", "predictor", "static")
WHOLE_MODEL = (0.25, 0.4, 0.5, 0.65)     # whole-model densities of the scope-all rows
WHOLE_POLICIES = (("topk", None), ("teal", "uniform"), ("teal", "greedy"), ("wina", "greedy"))
SAVES_WORK = {                            # policies that read fewer MLP weights than dense (topk needs all of h)
    "threshold": "reads every gate row to choose, then only the chosen rows of up and down",
    "predictor": "chooses before reading any MLP weight",
    "static": "chooses before reading any MLP weight",
}
BAR_RATIO, BAR_WORK = 1.05, 0.5         # "comparable accuracy at under half the compute": within 5% of the dense
                                         # twin's perplexity at under half the whole-model matrix work
CLAIMS = DEMO_DIR / "claims.json"
FORMAT = "sam-viz-claims/1"
MAX_BYTES, MAX_ROWS = 1 << 20, 200
GROUPS = {"baseline": "dense twin", "all-neurons": "demo-lm, every neuron",
          "trained": "demo-lm at its trained density", "post-hoc": "dense twin, post-hoc",
          "curve": "curve (topk)", "whole-model": "whole model"}
ROW_NUMBERS = ("density", "perplexity", "loss", "mlp_density", "model_density", "model_work")
MLP_NUMBERS = ("mlp_flops", "mlp_bytes", "dense_mlp_flops", "dense_mlp_bytes", "model_ratio")   # scope mlp only
FACTS = ("d_model", "d_ff", "layers", "bytes_per_param", "other_params", "attention_params")
PAGE_COLUMNS = ("part", "model", "policy", "scope", "allocation", "density", "perplexity", "vs dense twin",
                "whole-model matrix work", "MLP FLOPs vs dense", "MLP neurons computed", "MLP MFLOPs/token",
                "MLP weight MB/token", "command")   # the page's order
DECODE_NUMBERS = ("density", "dense_tok_s", "sparse_tok_s", "speedup", "ideal_speedup", "share_of_ideal", "f_mlp")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Setting:
    """One measured row: a model under a policy at a density, and the parts of the claim it serves;
    scope `all` sparsifies every projection's input (allocation: teal's and wina's, else None)."""
    model: str
    policy: str
    density: float
    groups: tuple[str, ...]
    scope: str = "mlp"
    allocation: str | None = None

    def command(self, max_tokens: int | None) -> str:
        """The one line that reproduces this row's perplexity."""
        scope = "" if self.scope == "mlp" else f" --scope {self.scope}"
        allocation = "" if self.allocation is None else f" --allocation {self.allocation}"
        density = "" if self.policy == "dense" else f" --density {self.density:g}"
        limit = "" if max_tokens is None else f" --max-tokens {max_tokens}"
        return (f"python -m sam_viz eval --model {self.model}{scope} --policy {self.policy}{allocation}{density}"
                f"{limit} --json")

    @property
    def key(self) -> tuple:
        return row_key(vars(self))


def row_key(row: dict) -> tuple:
    """What tells one row from another: model, policy, scope, allocation and density."""
    return (row["model"], row["policy"], row.get("scope") or "mlp", row.get("allocation"), round(row["density"], 9))


def plan(trained: float = TRAINED_DENSITY, curve=CURVE, whole=WHOLE_MODEL) -> list[Setting]:
    """Every setting the claim needs, each once (a setting in two parts of the claim lists both)."""
    wanted = [(DENSE, "dense", 1.0, "baseline"), (SPARSE, "dense", 1.0, "all-neurons")]
    wanted += [(SPARSE, p, trained, "trained") for p in SPARSE_POLICIES]
    wanted += [(DENSE, p, trained, "post-hoc") for p in SPARSE_POLICIES]
    wanted += [(m, "topk", d, "curve") for m in (SPARSE, DENSE) for d in curve]
    groups: dict[tuple, list[str]] = {}
    for model, policy, density, group in wanted:
        groups.setdefault((model, policy, density), []).append(group)
    out = [Setting(*key, tuple(g)) for key, g in groups.items()]
    return out + [Setting(m, p, d, ("whole-model",), "all", a) for m in (SPARSE, DENSE) for p, a in WHOLE_POLICIES
                  for d in whole]


def model_facts(loaded: LoadedModel) -> dict:
    """What the cost model needs of an architecture: widths, GLU or not, bytes per weight as
    loaded, the other matrix weights a token reads (attention projections, the LM head) and of
    those the attention projections' (the blocks' matrix weights outside the MLP)."""
    mlp = {id(p) for w in install(loaded) for p in w.parameters()}
    params = list(loaded.model.parameters())
    adapter = loaded.adapter
    attention = attention_weights(loaded)
    return {"d_model": loaded.model.config.hidden_size, "d_ff": loaded.d_ff, "layers": loaded.n_layers,
            "glu": adapter.up is not None or adapter.gate_up is not None or adapter.is_moe,
            "bytes_per_param": params[0].element_size(),
            "other_params": sum(p.numel() for p in params if p.dim() == 2 and id(p) not in mlp),
            "attention_params": 0 if attention is None else sum(sum(a.values()) for a in attention)}


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


def model_work(row: dict, facts: dict) -> float:
    """The share of the blocks' matrix weights read per token (embeddings and LM head excluded), counting
    what the policy reads to choose. Scope all: eval's model_density (topk, teal and wina choose from x
    itself). Scope mlp: the attention projections dense, and the MLP weights sam_viz.cost counts (topk:
    gate and up of every neuron; threshold: the gate of every neuron; predictor: its own weights too)."""
    if row.get("scope", "mlp") == "all":
        return row["model_density"]
    attention, per_byte = facts["attention_params"], facts["bytes_per_param"]
    return (attention + row["mlp_bytes"] / per_byte) / (attention + row["dense_mlp_bytes"] / per_byte)


def mlp_model_density(row: dict, facts: dict) -> float:
    """Scope mlp: eval's model_density from a row's numbers (attention dense, the MLP's weights at its
    neuron density: sam_viz.cost.mlp_scope_model_density), for rows measured before eval reported it."""
    neurons = facts["layers"] * facts["d_ff"]
    return mlp_scope_model_density(facts["attention_params"], neurons, row["mlp_density"] * neurons,
                                   facts["d_model"], facts["glu"])


def complete(row: dict, facts: dict) -> dict:
    """A scope-mlp row measured before the whole-model columns, with them computed (not measured again)."""
    row = {"scope": "mlp", "allocation": None, **row}
    if row.get("model_density") is None:
        row["model_density"] = mlp_model_density(row, facts)
    return {**row, "model_work": model_work(row, facts)}


def measure(loaded: LoadedModel, setting: Setting, max_tokens: int | None, text: str | None = None,
            progress: Progress | None = None) -> dict:
    """One row: `eval` of the setting on the held-out split (or `text`), with its cost and command;
    the kernel is the one `eval` picks by default, so the command reproduces the row."""
    say = progress or (lambda line: None)
    spec = EvalSpec(model=setting.model, policy=setting.policy, density=setting.density, max_tokens=max_tokens,
                    kernel=default_kernel(), scope=setting.scope, allocation=setting.allocation or "greedy")
    t0 = time.perf_counter()
    result = evaluate(loaded, spec, text,
                      calibrating=lambda frac, line: say(f"{setting.model} {setting.policy}: {line}"))
    facts = model_facts(loaded)
    row = {"model": setting.model, "policy": setting.policy, "scope": setting.scope, "allocation": setting.allocation,
           "density": spec.density, "groups": list(setting.groups), "perplexity": result.perplexity,
           "loss": result.loss, "tokens": result.tokens, "mlp_density": result.mlp_density,
           "model_density": result.model_density, "kernel": spec.kernel,
           **(row_cost(loaded, result, facts) if setting.scope == "mlp" else {}),
           "seconds": round(time.perf_counter() - t0, 1), "command": setting.command(max_tokens)}
    row["model_work"] = model_work(row, facts)
    say(f"{setting.model:14} {setting.policy:9} {setting.scope:3} {setting.allocation or '':7} {spec.density:<5g} "
        f"perplexity {row['perplexity']:9.3f}  model_work {row['model_work']:.4f}  ({row['seconds']:.0f} s)")
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
            "bar": {"perplexity_ratio": BAR_RATIO, "model_work": BAR_WORK},
            "weights": {m: weights_digest(m) for m in models if m in (SPARSE, DENSE)},
            "model": model_facts(load(models[0])), "rows": rows, "decode": []}


def resume(raw: dict, load: Callable[[str], LoadedModel], save: Callable[[dict], None],
           progress: Progress | None = None, first: Callable[[Setting], object] | None = None) -> dict:
    """claims.json's `raw` completed: its model facts and its rows' computed columns brought up to date
    (nothing measured again), then every setting of plan() it lacks measured, in plan
    order (`first`: a sort key that measures some first), each saved as it arrives (a cut-off run
    resumes where it stopped). The measured rows keep the file's token limit."""
    settings = plan()
    facts = model_facts(load(SPARSE))
    raw = {**raw, "model": facts, "bar": {"perplexity_ratio": BAR_RATIO, "model_work": BAR_WORK}}
    raw["rows"] = [complete(r, facts) if r.get("scope", "mlp") == "mlp" else r for r in raw["rows"]]
    order = {s.key: i for i, s in enumerate(settings)}
    for s in sorted(settings, key=first) if first else settings:
        if s.key in {row_key(r) for r in raw["rows"]}:
            continue
        raw["rows"] = sorted(raw["rows"] + [measure(load(s.model), s, raw.get("max_tokens"), None, progress)],
                             key=lambda r: order.get(row_key(r), len(order)))
        save(raw)
    save(raw)
    return raw


# ------------------------------------------------------------------------------ reading and verdict

def _number(value, low: float = 0.0, high: float = math.inf) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) and low <= value <= high else None


def _valid_row(r) -> dict | None:
    if not isinstance(r, dict) or r.get("model") not in (SPARSE, DENSE) or r.get("policy") not in POLICIES:
        return None
    scope, allocation = r.get("scope", "mlp"), r.get("allocation")
    if scope not in ("mlp", "all") or allocation not in (None, "uniform", "greedy"):
        return None
    numbers = {k: _number(r.get(k)) for k in ROW_NUMBERS + (MLP_NUMBERS if scope == "mlp" else ())}
    if None in numbers.values() or not 0 < numbers["density"] <= 1 or not numbers["perplexity"] > 0:
        return None
    command = str(r.get("command", ""))[:200]
    groups = [g for g in r.get("groups", []) if g in GROUPS] if isinstance(r.get("groups"), list) else []
    tokens = _number(r.get("tokens"), 1)
    return {"model": r["model"], "policy": r["policy"], "scope": scope, "allocation": allocation, **numbers,
            "groups": groups, "tokens": int(tokens or 0),
            "command": command if command.startswith("python -m sam_viz eval ") else ""}


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


def find(claims: dict, model: str, policy: str, density: float = 1.0, scope: str = "mlp",
         allocation: str | None = None) -> dict | None:
    for r in claims["rows"]:
        if (r["model"] == model and r["policy"] == policy and r["scope"] == scope and r["allocation"] == allocation
                and (policy == "dense" or abs(r["density"] - density) < 1e-9)):
            return r
    return None


def label(row: dict) -> str:
    """The policy of a row in words: `threshold (MLP only)`, `teal greedy (every projection)`."""
    if row["scope"] == "mlp":
        return f"{row['policy']} (MLP only)"
    return f"{row['policy']}{' ' + row['allocation'] if row['allocation'] else ''} (every projection)"


def claim(claims: dict) -> dict[str, dict]:
    """Per policy (label()), over both models and every density: whether some row reaches comparable
    accuracy (perplexity within BAR_RATIO of the dense twin's) at under BAR_WORK of the whole-model
    matrix work; `best`: the comparable row with the least work under the bar if one is, else the one
    with the lowest perplexity under it (None when no row is under it); `least`: the row with the least
    work; `comparable`: the comparable row with the least work (None when none is)."""
    base = find(claims, DENSE, "dense")
    out: dict[str, dict] = {}
    if base is None:
        return out
    for r in claims["rows"]:
        if r["policy"] != "dense":
            out.setdefault(label(r), {"rows": []})["rows"].append({**r, "ratio": r["perplexity"] / base["perplexity"]})
    for v in out.values():
        rows = v.pop("rows")
        ok = [r for r in rows if r["ratio"] <= BAR_RATIO]
        under = [r for r in rows if r["model_work"] < BAR_WORK]
        hold = [r for r in under if r["ratio"] <= BAR_RATIO]
        v.update(holds=bool(hold), least=min(rows, key=lambda r: r["model_work"]),
                 comparable=min(ok, key=lambda r: r["model_work"]) if ok else None,
                 best=(min(hold, key=lambda r: (r["model_work"], r["ratio"])) if hold else
                       min(under, key=lambda r: r["ratio"]) if under else None))
    return out


def verdict(claims: dict) -> dict:
    """How far the claim holds. `claim`: per policy, against whole-model matrix work (claim()).
    `policies`: per MLP policy at the trained density, demo-lm's perplexity relative to the dense
    twin's, the neurons and MLP FLOPs it computes, and how much each model loses to that policy
    against its own every-neuron perplexity. `sentence`: plain sentences computed from those numbers."""
    base, d = find(claims, DENSE, "dense"), claims["trained_density"]
    if base is None:
        return {"policies": {}, "claim": {}, "sentence": "The claims file has no dense-twin row, so nothing can be "
                "compared."}
    own = {m: find(claims, m, "dense") for m in (SPARSE, DENSE)}
    out = {}
    for p in SPARSE_POLICIES:
        r, twin = find(claims, SPARSE, p, d), find(claims, DENSE, p, d)
        if r is None:
            continue
        ratio, flops = r["perplexity"] / base["perplexity"], r["mlp_flops"] / r["dense_mlp_flops"]
        out[p] = {"perplexity": r["perplexity"], "ratio": ratio, "mlp_density": r["mlp_density"],
                  "flops_ratio": flops, "model_ratio": r["model_ratio"], "model_work": r["model_work"],
                  "loss_vs_own_dense": r["perplexity"] / own[SPARSE]["perplexity"] if own[SPARSE] else None,
                  "twin_loss_vs_dense": twin["perplexity"] / base["perplexity"] if twin else None}
    c = claim(claims)
    return {"dense_perplexity": base["perplexity"], "policies": out, "claim": c,
            "sentence": _sentence(base, d, out, c)}


def _at(r: dict) -> str:
    return f"{r['model']} at {r['density']:g}: {_pct(r['ratio'])} at {r['model_work']:.1%} of the work"


def policy_sentence(name: str, v: dict) -> str:
    """One sentence: whether the policy reaches comparable accuracy at under half the whole-model work."""
    why = {"topk (MLP only)": " (it computes every h to choose)",
           "threshold (MLP only)": " (it reads every gate row to choose)"}.get(name, "")
    if v["holds"]:
        return f"{name}: yes, {_at(v['best'])}."
    if v["best"] is None:
        return (f"{name}: no, it never goes under {BAR_WORK:.0%} of the work{why}; its least is "
                f"{_at(v['least'])}.")
    then = (f"; it stays comparable only down to {_at(v['comparable'])}" if v["comparable"] else
            "; no row of it is comparable")
    return f"{name}: no, under {BAR_WORK:.0%} of the work its best is {_at(v['best'])}{then}."


def summary(claims: dict) -> list[str]:
    """The verdict in three lines (markdown), each computed from verdict()'s numbers: the policies with
    which the claim holds against whole-model matrix work, those with which it does not, and dynamic vs
    static at the trained density."""
    v, d = verdict(claims), claims["trained_density"]
    c, p = v["claim"], v["policies"]
    if not c:
        return [v["sentence"]]
    holds = [k for k, r in c.items() if r["holds"]]
    bar = f"within {BAR_RATIO - 1:.0%} of the dense twin's perplexity at under {BAR_WORK:.0%} of the whole-model " \
          "matrix work"
    lines = [(f"**Claim holds** with {_names(holds)}" if holds else "**Claim does not hold** with any policy")
             + f" ({bar})."]
    misses = [k for k in c if k not in holds]
    if misses:
        lines.append(f"**Not** with {_names(misses)}.")
    if "predictor" in p and "static" in p:
        dyn, sta = p["predictor"]["perplexity"], p["static"]["perplexity"]
        lines.append(f"**Dynamic vs static** at {d:g}: predictor {dyn:.2f}, static {sta:.2f} perplexity: dynamic "
                     f"{'beats' if dyn < sta else 'does not beat'} static.")
    return lines


def _names(labels: list[str]) -> str:
    """label()s grouped by scope: `threshold, static (MLP only); teal greedy (every projection)`."""
    groups: dict[str, list[str]] = {}
    for name in labels:
        policy, scope = name[:-1].split(" (")
        groups.setdefault(scope, []).append(policy)
    return "; ".join(f"{', '.join(ps)} ({scope})" for scope, ps in groups.items())


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def _sentence(base: dict, density: float, v: dict, c: dict) -> str:
    full = v.get("topk", {}).get("loss_vs_own_dense")
    parts = [f"The dense twin's held-out perplexity is {base['perplexity']:.2f}. \"Comparable accuracy at under half "
             f"the compute\", counting the whole model's matrix work (the blocks' weights read per token, "
             f"embeddings excluded, with what a policy reads to choose): within {BAR_RATIO - 1:.0%} of it at under "
             f"{BAR_WORK:.0%} of the work."]
    parts += [policy_sentence(name, r) for name, r in c.items()]
    if "predictor" in v and "static" in v:
        beats = v["predictor"]["perplexity"] < v["static"]["perplexity"]
        parts.append(f"Dynamic vs static at {density:g} of the MLP neurons: predictor "
                     f"{v['predictor']['perplexity']:.2f}, static {v['static']['perplexity']:.2f}: dynamic {'beats' if beats else 'does not beat'} static.")
    if full is not None and v["topk"]["twin_loss_vs_dense"] is not None:
        less = full < v["topk"]["twin_loss_vs_dense"]
        parts.append(f"Against its own every-neuron perplexity, demo-lm under MLP topk {density:g} changes by "
                     f"{_pct(full)} and the dense twin under the same post-hoc topk by "
                     f"{_pct(v['topk']['twin_loss_vs_dense'])}: the sparse-trained model degrades "
                     f"{'less' if less else 'more'} than its twin.")
    holds = [k for k, r in c.items() if r["holds"]]
    parts.append("So at this scale the claim " + (f"holds with {', '.join(holds)}, and not with the other policies."
                                                  if holds else "holds with no policy measured here."))
    return " ".join(parts)


def scoped(claims: dict, scope: str) -> dict:
    """The claims with the rows of one scope only (the MLP-density curve draws scope mlp's)."""
    return {**claims, "rows": [r for r in claims["rows"] if r["scope"] == scope]}


def table_rows(claims: dict) -> list[dict]:
    """The claims table, one dict per row, columns in display order (the MLP's columns blank under scope
    all, where every neuron's h is computed and the MLP's share of the work is part of the whole's)."""
    base = find(claims, DENSE, "dense")

    def mlp(r: dict) -> dict:
        if r["scope"] != "mlp":
            return dict.fromkeys(("MLP neurons computed", "MLP MFLOPs/token", "MLP weight MB/token",
                                  "MLP FLOPs vs dense"), "")
        return {"MLP neurons computed": f"{r['mlp_density']:.1%}", "MLP MFLOPs/token": round(r["mlp_flops"] / 1e6, 3),
                "MLP weight MB/token": round(r["mlp_bytes"] / 1e6, 3),
                "MLP FLOPs vs dense": f"{r['mlp_flops'] / r['dense_mlp_flops']:.0%}"}
    rows = [{"part": ", ".join(GROUPS[g] for g in r["groups"]), "model": r["model"], "policy": r["policy"],
             "scope": r["scope"], "allocation": r["allocation"] or "", "density": r["density"],
             "perplexity": round(r["perplexity"], 3),
             "vs dense twin": _pct(r["perplexity"] / base["perplexity"]) if base else "",
             "whole-model matrix work": f"{r['model_work']:.1%}", **mlp(r), "command": r["command"]}
            for r in claims["rows"]]
    return [{k: r[k] for k in PAGE_COLUMNS} for r in rows]


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
           "Scope `mlp` sparsifies the MLP's neurons only; scope `all` the input of every projection (q, k, v, o, "
           "gate, up, down), `teal` and `wina` with the allocation named. *Whole-model matrix work* is the share "
           "of the blocks' matrix weights read per token (embeddings and LM head excluded), counting what a "
           "policy reads to choose: the MLP-only rows keep the attention dense, and MLP topk and threshold read "
           "weights to choose, so they save less than their density. MLP FLOPs and weight bytes are per token as "
           "a batch-1 decoder pays them (sam_viz/cost.py), "
           f"{claims['model']['bytes_per_param']} bytes per weight as eval loads them; each row's time is in "
           "claims.json (`seconds`).", "", markdown_table(claims)]
    decode = decode_table(claims)
    if decode:
        head = list(decode[0])
        out += ["", "Decode speed (batch 1, greedy, KV cache, `cpu` kernel; ideal = 1 / (f_other + f_mlp x density), "
                "f_mlp = the MLPs' measured share of a dense step):", "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in decode]
    return "\n".join(out + ["", verdict(claims)["sentence"]])
