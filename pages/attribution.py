"""Attribution: which input tokens drive the output, in the dense and the sparse model, and which
MLP neurons carry it (captum). Results are kept on the analysis (shared by sessions, saved with the
run), so a widget that only changes the view does not compute them again."""
import pandas as pd
import streamlit as st

from pages._shared import explain, page_context, progress_bar, show
from sam_viz import InputError
from sam_viz.attribution import (MAX_QUERY_CHARS, MAX_STEPS, attribute, attribution_key, default_query,
                                 delta_text, likely_targets, recall, remember)
from sam_viz.figures.routing import neuron_attribution_plot
from sam_viz.text import colored_tokens, escape_markdown

METHOD_NAMES = {"ig": "integrated gradients", "ixg": "input x gradient"}

ctx = page_context()
st.header("Attribution")
explain("""
**Which tokens of the prompt drive the output?** For a language model the output is the score
(logit) of one next token you pick. For a sentence encoder it is, as in semantic search, the cosine
of the prompt's embedding to the dense model's embedding of a **query** sentence you give (by
default the prompt's first sentence when it has several, else a fixed question). Integrated
gradients walks from a neutral input (every word replaced by an unknown-word token) to your prompt
and adds up how much each token's embedding moved the output; the **delta** is how far that sum is
from the real change of the output. A delta below what float32 numbers can tell apart at this output
shows as "< 1.5e-08" (say): the integral converged to every digit kept, which does not make the model
linear. Input x gradient is a faster, rougher estimate.

**Under sparsity**: the sparse model keeps, along the whole path, the neurons it chose on your
prompt (its selection is *frozen*), so what is explained is exactly the sparse model that ran. If
the selection were recomputed at every step, the output would jump where the chosen set changes
and the gradients would not see those jumps. (Mixture-of-experts layers keep routing at every step.)

**Neurons**: the same question one level down: which MLP neurons of a layer carry the output.
**Attribution mass lost** is the share of the dense model's neuron attribution that sits on
neurons the sparse model dropped; 0 means the sparse model kept everything that mattered.

**Rounding noise**: where the output's gradient is zero at the input (a query equal to the
prompt, for one), the attributions are rounding errors of the model's number format: values whose
total is below that format's precision times the output's size are not drawn.
""")


def noise_sentence(which: tuple[bool, bool], what: str) -> str:
    """One sentence: whose values (which: dense, sparse) are noise and left out."""
    whose = {(True, False): "dense model's", (False, True): "sparse model's"}.get(which, "dense and sparse models'")
    return (f"The {whose} {what} are within rounding noise of zero (the output's gradient vanishes at the "
            "input), so they are not drawn.")


def live_attribution():
    """The target and method widgets; the attribution kept on the analysis, else computed now."""
    loaded = ctx.model()
    c1, c2, c3 = st.columns([2, 1, 1])
    with c1:
        if loaded.kind == "causal-lm":
            choices = likely_targets(loaded, ctx.spec)
            pick = st.selectbox("Next token to explain", range(len(choices)),
                                format_func=lambda i: f"{choices[i]['token']}  ({choices[i]['prob']:.1%})")
            target_id, query = choices[pick]["id"], None
        else:
            default = default_query(ctx.spec.prompt)
            typed = st.text_input("Query: the output is the prompt's similarity to this sentence", key="query",
                                  bind="query-params", max_chars=MAX_QUERY_CHARS, placeholder=default,
                                  help=f"Empty: {escape_markdown(default)}")
            target_id, query = None, (typed or "").strip() or default
    with c2:
        method = st.radio("Method", ["ig", "ixg"], horizontal=True, format_func=METHOD_NAMES.get)
    with c3:
        steps = st.number_input("Steps", 2, MAX_STEPS, 50, disabled=method != "ig")
    kept = recall(ctx.analysis, attribution_key(method, int(steps), target_id, query))
    if kept is not None:
        return kept
    try:
        with progress_bar("Attributing") as step:
            result = attribute(loaded, ctx.spec, method=method, steps=int(steps), target_id=target_id, query=query,
                               progress=step)
    except InputError as exc:
        st.error(escape_markdown(str(exc)))
        st.stop()
    remember(ctx.analysis, result)
    return result


def describe(a) -> str:
    target = (f"next token '{a.target['token']}'" if a.target["kind"] == "logit"
              else f"similarity to '{a.target['query'][:60]}'")
    return f"{METHOD_NAMES[a.method]}{f' ({a.steps} steps)' if a.steps else ''}, {target}"


def saved_attribution():
    """A saved run: the attributions it was saved with; computing a new one needs the model."""
    stored = ctx.analysis.attributions
    if not stored:
        st.info("This run was saved without an attribution, and computing one needs the model: "
                "**Analyse live** above runs these settings on the model.")
        st.stop()
    pick = st.selectbox("Saved attribution", range(len(stored)), format_func=lambda i: describe(stored[i]))
    return stored[pick]


a = saved_attribution() if ctx.run_id else live_attribution()
m1, m2, m3 = st.columns(3)
if a.delta_dense is not None:
    for col, which, delta, resolution in ((m1, "dense", a.delta_dense, a.delta_resolution[0]),
                                          (m2, "sparse", a.delta_sparse, a.delta_resolution[1])):
        col.metric(f"delta, {which}", delta_text(delta, resolution),
                   help=f"sum of attributions - (f(input) - f(baseline)), in float32: {delta:.2e}. Below "
                        f"{resolution:.1e}, float32's spacing at this f, it is rounding: the sum equals the change "
                        "of f to every digit float32 keeps because the integral converged, not because the model "
                        "is linear.")
m3.metric("time", f"{a.timings_ms['total'] / 1000:.2f} s")


noise = a.token_noise
rows = [(label, values) for label, values, noisy in (("Dense", a.dense, noise[0]), ("Sparse", a.sparse, noise[1]))
        if not noisy]
top = max((abs(v) for _, values in rows for v in values), default=0.0)       # one colour scale for every row
if not any(noise):
    rows.append(("Sparse - dense", [s - d for d, s in zip(a.dense, a.sparse)]))
if rows:
    st.caption(f"Red pushes the output up, blue pulls it down. Every row is on one scale: full colour at "
               f"|attribution| {top:.3g}, the largest of the model rows. Hover a token for its value.")
for label, values in rows:
    st.markdown(f"**{label}**<br>{colored_tokens(a.tokens, values, scale=top)}", unsafe_allow_html=True)
    if label == "Sparse - dense":
        st.caption(f"Largest |sparse - dense|: {max(map(abs, values)):.3g}, "
                   f"{max(map(abs, values)) / (top or 1):.0%} of the full-colour value.")
if any(noise):
    st.info(noise_sentence(noise, "token attributions"))

if a.mass_lost:
    st.subheader("Neurons")
    layer = st.number_input("Layer", 0, len(a.mass_lost) - 1, 0, key="layer", bind="query-params")
    c1, c2 = st.columns([2, 1])
    with c1:
        if not all(a.neuron_noise[layer]):
            show(neuron_attribution_plot(a, layer), key="neuron_attr")
        if any(a.neuron_noise[layer]):
            st.info(noise_sentence(a.neuron_noise[layer], f"neuron attributions in layer {layer}"))
    with c2:
        st.dataframe(pd.DataFrame({"layer": range(len(a.mass_lost)), "attribution mass lost": a.mass_lost,
                                   "L1 dense": a.neuron_l1_dense, "L1 sparse": a.neuron_l1_sparse}),
                     hide_index=True)
        noisy = [str(i) for i, lost in enumerate(a.mass_lost) if lost is None]
        if noisy:
            st.info(f"Attribution mass lost is left out for layer{'s' if len(noisy) > 1 else ''} {', '.join(noisy)}, "
                    "where the dense model's neuron attributions are within rounding noise.")
else:
    st.info("Neuron attribution is not available for mixture-of-experts models yet.")
