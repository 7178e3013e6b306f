"""The classroom tour's comparative sentences, computed from the numbers they state (as the claim
page's verdict is, sam_viz.claims): a sentence never says "lower" where its numbers say higher. Each
comparison shows both numbers in bold, "**28.81**, lower than ... **30.58**", and its direction word
("lower than", "higher than", "the same as") is chosen from the numbers as shown, after rounding.
Numbers come from models/demo/claims.json (sam_viz.claims.read_claims) and from the step's own runs.
No Streamlit.
"""
from __future__ import annotations

from . import claims as cl

UP, DOWN, SAME = "higher than", "lower than", "the same as"


def direction(a: str, b: str) -> str:
    """The word for a against b, compared as shown ("28.81" vs "30.58"; "+8.1%" vs "-5.6%")."""
    x, y = (float(s.replace("%", "").replace("−", "-")) for s in (a, b))
    return SAME if x == y else UP if x > y else DOWN


def compare(subject: str, a: str, other: str, b: str, after: str = "", up: str = UP, down: str = DOWN) -> str:
    """"`subject` **a**`after`, lower than `other` **b**": the direction from a and b as shown; `up`
    and `down` may say it in other words ("more than", "less than")."""
    word = {UP: up, DOWN: down, SAME: SAME}[direction(a, b)]
    return f"{subject} **{a}**{after}, {word} {other} **{b}**"


def ppl(row: dict) -> str:
    return f"{row['perplexity']:.2f}"


def pct(x: float) -> str:
    return f"{x:.0%}"


def change(new: dict, old: dict) -> str:
    return f"{(new['perplexity'] / old['perplexity'] - 1) * 100:+.1f}%"


def cost(claims: dict | None, density: float) -> str:
    """Step 3: what density means in work, from the claims' FLOPs per token (sam_viz.cost)."""
    v = cl.verdict(claims)["policies"] if claims else {}
    if "topk" not in v:
        return ("It is not a tenth of the work, though: topk, the policy of this tour, must compute every neuron's "
                "value to find the strongest ones (the claim page measures what that costs).")
    text = compare("It is not a tenth of the work, though: topk, the policy of this tour, must compute every neuron's "
                   "value to find the strongest ones, so it still costs", pct(v["topk"]["flops_ratio"]), "the",
                   pct(density), after=" of the dense MLP's FLOPs (the number on the claim page)",
                   up="more than", down="less than") + " the density says."
    cheap = [p for p in ("static", "predictor") if p in v]
    if cheap:
        text += (" Policies that choose before reading any weight save the work: " + ", ".join(
            f"{p} costs {pct(v[p]['flops_ratio'])}" for p in cheap) + ".")
    return text


def mass(kept: float, density: float) -> str:
    """Step 3: the kept neurons' share of Σ|h| against the share of neurons kept."""
    return compare("The kept neurons are the strongest ones: their share of the total activity (*mass kept*: their "
                   "part of Σ|h|, the sum of every neuron's absolute value), averaged over the layers, is",
                   pct(kept), "their share of the neurons,", pct(density), up="more than", down="less than") + "."


def baseline(claims: dict | None, density: float) -> str:
    """Steps 4 and 5: "all neurons" on demo-lm is not the better setting: it was trained sparse."""
    full, trained = (cl.find(claims, cl.SPARSE, p, density) if claims else None for p in ("dense", "topk"))
    if full is None or trained is None:
        return (f"demo-lm was trained with {density:.0%} of its neurons, so \"all neurons\" is the comparison here, "
                "not a better model.")
    return (f"demo-lm was trained with {density:.0%} of its neurons, so \"all neurons\" is a setting it never "
            "trained in, not the better model: " + compare("on held-out text its perplexity with all neurons is",
                                                          ppl(full), f"with {density:.0%}", ppl(trained))
            + " (perplexity: how surprised the model is by the next token; lower is better).")


def twin(claims: dict | None, density: float) -> list[str]:
    """Step 6: the two models at the trained density on held-out text, and each against its own
    every-neuron perplexity. [] without the four rows."""
    if not claims:
        return []
    rows = {(m, p): cl.find(claims, m, p, density) for m in (cl.SPARSE, cl.DENSE) for p in ("dense", "topk")}
    if None in rows.values():
        return []
    s, d = rows[(cl.SPARSE, "topk")], rows[(cl.DENSE, "topk")]
    return [compare(f"On held-out text with {density:.0%} of the neurons, demo-lm's perplexity is", ppl(s),
                    "demo-lm-dense's", ppl(d)) + " (lower is better).",
            compare(f"From all neurons to {density:.0%}, demo-lm's perplexity changes by",
                    change(s, rows[(cl.SPARSE, "dense")]), "demo-lm-dense's change of",
                    change(d, rows[(cl.DENSE, "dense")])) + "."]


def favoured(a: str, b: str, lower_is_better: bool) -> int | None:
    """0 when the first number shown is the better one, 1 when the second is, None when equal."""
    word = direction(a, b)
    return None if word == SAME else int((word == DOWN) != lower_is_better)


def verdict(perplexity: tuple[str, str], agreement: tuple[str, str], names: tuple[str, str],
            split: bool = False) -> str:
    """Step 6's lesson from its two measures (perplexity, lower is better; same first choice,
    higher is better), each given as (first model's, second model's) number as shown; `split`: the
    prompts, one by one, do not all favour the same model."""
    p, a = favoured(*perplexity, True), favoured(*agreement, False)
    if p is not None and p == a:
        return f"Both measures favour {names[p]}" + (", on average: not on every prompt." if split else ".")
    if p is None and a is None:
        return "Neither measure tells the two models apart."
    said = [f"held-out perplexity favours {names[p]}" if p is not None else "held-out perplexity is a tie",
            f"the prompts' first choices favour {names[a]}" if a is not None else "the prompts' first choices tie"]
    return f"The evidence is mixed: {said[0]}, {said[1]}."


def prompt_by_prompt(pairs: list[tuple[str, str]], names: tuple[str, str]) -> str:
    """How often each model keeps more first choices, prompt by prompt ((first, second) as shown);
    the split said as it is when neither wins every prompt."""
    wins = [sum(favoured(a, b, False) == i for a, b in pairs) for i in (0, 1)]
    ties = len(pairs) - sum(wins)
    tied = f", {ties} {'tie' if ties == 1 else 'ties'}" if ties else ""
    counts = f"{names[0]} keeps more on {wins[0]} of the {len(pairs)} prompts, {names[1]} on {wins[1]}{tied}"
    return (f"Prompt by prompt it is mixed: {counts}." if all(wins) else f"Prompt by prompt: {counts}.")


def whole_model(mlp_work: float, mlp_density: float, all_work: float, all_density: float) -> str:
    """Step 8: the share of all the layers' weights read per token, MLP-only against every projection."""
    return compare(f"Skipping neurons in the MLP only, at {mlp_density:.0%} of them, still reads", pct(mlp_work),
                   f"every projection at density {all_density:g} reads,", pct(all_work),
                   after=" of all the layers' weights", up="more than", down="less than") + "."


def greedy(uniform_error: float, greedy_error: float) -> str:
    """Step 8: the layers' output error (mean over layers) under greedy against uniform allocation."""
    return compare("On sample text, with greedy allocation, a layer's output moves on average by", pct(greedy_error),
                   "with every projection at the same density,", pct(uniform_error),
                   up="more than", down="less than") + " (measured on teal's calibration)."


def static(claims: dict | None, density: float) -> str:
    """Step 7: static pruning against dynamic topk on held-out text."""
    rows = [cl.find(claims, cl.SPARSE, p, density) if claims else None for p in ("static", "topk")]
    if None in rows:
        return ""
    return compare(f"On held-out text, static at {density:.0%} of the neurons has perplexity", ppl(rows[0]),
                   "topk's", ppl(rows[1])) + " at the same density (lower is better)."
