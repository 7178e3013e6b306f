"""Classroom tour: nine steps on demo-lm (models/demo) for a teacher in front of a class, from what
a neuron is to dynamic vs static sparsity and sparsity on every projection. Each step shows the app's
own figure with its settings applied, computed from RunSpecs the tour builds (the user's sidebar stays
as it was until "Open this in the app", and says it is not in use). The step lives in the URL (?step=4); a bad value
shows step 1, past the end the last step. Every comparative sentence is computed from the numbers
it states (sam_viz.tour_text): the step's own runs, or the held-out measurements of the claim page
(models/demo/claims.json)."""
from dataclasses import dataclass
from typing import Callable

import streamlit as st

from pages._shared import (DEMO_MODEL, DEMO_PRESET, DOC_PRESETS, PRESETS, cached_analysis, cached_model, show,
                           sidebar_only, use_settings, work_button)
from sam_viz import SWEEP_DENSITIES, RunSpec, greedy_continuation, mass_curve
from sam_viz import claims as cl
from sam_viz import tour_text as tt
from sam_viz import whole_model as wm
from sam_viz.figures import quality, routing
from sam_viz.figures import whole_model as wm_figs
from sam_viz.figures.firing import firing_heatmap, token_neurons
from sam_viz.text import continuation_html, escape_html, escape_markdown
from sam_viz.sparse_ops import get_calibration

TWIN = "demo-lm-dense"
TRAINED = 0.1                         # demo-lm's density in training: 102 of 1024 neurons per token
DROP = (0.5, 0.25, 0.1, 0.05)         # the densities the class can try in steps 4 and 5
N_NEW = 20                            # tokens each continuation writes
SIDEBAR_NOTE = ("Not in use during the tour: each step runs demo-lm on its own prompt. The settings below are "
                "yours, kept for the other pages; \"Open this in the app\" puts a step's settings here.")
ENDOFTEXT = ("The first token, `<|endoftext|>`, is a marker the model reads before every text (it stands for "
             "\"a new text starts here\"); it is not part of the prompt.")


@dataclass(frozen=True)
class Step:
    title: str
    text: str
    draw: Callable[[], tuple[str, RunSpec] | None]     # renders; returns (page, spec) for "open in the app"


def spec(policy: str = "topk", density: float = TRAINED, model: str = DEMO_MODEL,
         prompt: str = PRESETS[DEMO_PRESET], scope: str = "mlp") -> RunSpec:
    return RunSpec(prompt=prompt, model=model, policy=policy, density=density, scope=scope)


@st.cache_data(show_spinner=False, max_entries=32)
def continuation(run: RunSpec) -> dict:
    return greedy_continuation(cached_model(run.model), run, N_NEW)


def labels(density: float) -> tuple[str, str]:
    """What differs between a step's two passes: the neurons used, not the model."""
    return "all neurons", f"{density:.0%} of the neurons"


def x_max(*analyses) -> float:
    """One probability axis for every next-token panel shown together."""
    return 1.05 * max(it["prob"] for a in analyses for side in a.next_tokens.values() for it in side)


@st.cache_data(show_spinner=False)
def claims() -> dict | None:
    """The claim page's measurements (models/demo/claims.json); None when missing or unreadable."""
    try:
        return cl.read_claims()
    except ValueError:
        return None


def show_continuation(run: RunSpec, names=("dense", "sparse"), label: str | None = None) -> None:
    with st.spinner(f"Writing {N_NEW} tokens with {escape_markdown(run.model)}..."):
        c = continuation(run)
    label_of = dict(zip(("dense", "sparse"), (x.capitalize() for x in labels(run.density))))
    prompt = f'<span style="color: grey">{escape_html(run.prompt)}</span>'
    for name in names:
        st.markdown(f"**{label or label_of[name]}:** {prompt}{continuation_html(c[name], c['first_divergence'])}",
                    unsafe_allow_html=True)
    if "dense" in names and "sparse" in names:
        first = c["first_divergence"]
        st.caption("The two texts are the same." if first is None else
                   f"The highlighted token is where the texts first differ (token {first + 1} of {N_NEW}).")


def agreement(a) -> None:
    c1, c2 = st.columns(2)
    c1.metric("Same first choice as all neurons", f"{a.compare['top1_agreement']:.0%}",
              help="Over every position of the prompt: how often the most likely next token is the same.")
    c2.metric("How far the guesses moved (KL)", f"{a.compare['kl']:.3f}",
              help="KL divergence, in plain words: how far the probabilities the model gives every possible next "
              "token moved from those with all neurons, averaged over the prompt. 0 = not at all; the larger, "
              "the further.")


def layer_and_token(a) -> tuple[int, int]:
    c1, c2 = st.columns([1, 3])
    layer = c1.number_input("Layer", 0, a.n_layers - 1, a.n_layers // 2, key="tour_layer", bind="query-params")
    token = c2.selectbox("Token", range(len(a.tokens)), index=len(a.tokens) - 1, key="tour_token",
                         bind="query-params", format_func=lambda i: f"{i}: {a.tokens[i]}",
                         help="· marks a space, ¶ a new line. " + ENDOFTEXT)
    return int(layer), int(token)


def density_choice() -> float:
    return st.select_slider("Density: the share of neurons kept", DROP, value=TRAINED, key="tour_density",
                            bind="query-params", format_func=lambda d: f"{d:g}")


def neuron() -> tuple[str, RunSpec]:
    run = spec("dense", 1.0)
    a = cached_analysis(run)
    layer, _ = layer_and_token(a)
    show(firing_heatmap(a, layer), key="tour_heatmap_dense")
    return "pages/firing.py", run


def firing() -> tuple[str, RunSpec]:
    a = cached_analysis(spec())
    layer, token = layer_and_token(a)
    show(firing_heatmap(a, layer), key="tour_heatmap")
    show(token_neurons(a, layer, token), key="tour_token_neurons")
    st.caption("In layer 0 a kept neuron's orange bar equals its blue one: both runs read the same input. "
               if layer == 0 else
               f"An orange bar need not match its blue one: layers 0 to {layer - 1} before this one "
               "also dropped neurons, so this layer reads a slightly different input and its neurons compute "
               "slightly different values. (In layer 0 they are equal.)")
    return "pages/firing.py", a.spec


def density() -> tuple[str, RunSpec]:
    a = cached_analysis(spec())
    st.markdown(tt.cost(claims(), TRAINED))
    kept = sum(lf.mass_kept_share for lf in a.layers) / a.n_layers
    st.markdown(tt.mass(kept, TRAINED))
    c1, c2 = st.columns(2)
    with c1:
        show(quality.density_per_layer(a), key="tour_density_layers")
    with c2:
        show(quality.mass_curve_plot(mass_curve(a, SWEEP_DENSITIES), SWEEP_DENSITIES), key="tour_mass_curve")
    return "pages/density.py", a.spec


def next_token() -> tuple[str, RunSpec]:
    a = cached_analysis(spec(density=density_choice()))
    show(quality.next_token_plot(a, labels(a.spec.density), x_max(a)), key="tour_next_tokens")
    agreement(a)
    st.caption(tt.baseline(claims(), TRAINED))
    return "pages/compare.py", a.spec


def writing() -> tuple[str, RunSpec]:
    run = spec(density=density_choice())
    st.markdown(tt.baseline(claims(), TRAINED))
    show_continuation(run)
    return "pages/compare.py", run


def twin() -> tuple[str, RunSpec]:
    evidence = claims()
    sentences = tt.twin(evidence, TRAINED)
    if not sentences:
        st.info("The claims file with the held-out perplexities is missing, so this step can only show the prompts.")
    else:
        tokens = cl.find(evidence, DEMO_MODEL, "topk", TRAINED)["tokens"]
        st.markdown(f"**Measured on held-out text** (the claim page: {tokens:,} tokens of the Python documentation "
                    "that no training step saw), perplexity:")
        st.dataframe(twin_table(evidence), hide_index=True, key="tour_twin_perplexity")
        st.markdown(" ".join(sentences))
    st.markdown(f"**Measured on the {len(DOC_PRESETS)} documentation prompts**, each model with "
                f"{TRAINED:.0%} of its neurons against all of its neurons:")
    runs = {(m, p): cached_analysis(spec(model=m, prompt=p)) for m in (TWIN, DEMO_MODEL) for p in DOC_PRESETS.values()}
    agree = {key: a.compare["top1_agreement"] for key, a in runs.items()}
    st.dataframe([{"prompt": p, **{f"{m}: same first choice": tt.pct(agree[(m, p)]) for m in (TWIN, DEMO_MODEL)}}
                  for p in DOC_PRESETS.values()], hide_index=True, key="tour_twin_prompts")
    pairs = [(tt.pct(agree[(DEMO_MODEL, p)]), tt.pct(agree[(TWIN, p)])) for p in DOC_PRESETS.values()]
    mean = {m: tt.pct(sum(agree[(m, p)] for p in DOC_PRESETS.values()) / len(DOC_PRESETS)) for m in (TWIN, DEMO_MODEL)}
    st.markdown(tt.compare("Averaged over these prompts, demo-lm keeps its first choice at", mean[DEMO_MODEL],
                           "demo-lm-dense's", mean[TWIN], after=" of the positions") + ". "
                + tt.prompt_by_prompt(pairs, (DEMO_MODEL, TWIN)) + " This counts how often dropping neurons leaves "
                "a model's best guess unchanged, not whether the guess is right.")
    if sentences:
        ppl = tuple(tt.ppl(cl.find(evidence, m, "topk", TRAINED)) for m in (DEMO_MODEL, TWIN))
        split = len({tt.favoured(a, b, False) for a, b in pairs} - {None}) > 1
        st.markdown("**" + tt.verdict(ppl, (mean[DEMO_MODEL], mean[TWIN]), (DEMO_MODEL, TWIN), split) + "**")
    st.markdown(f"**The texts they write**, {N_NEW} tokens each with {TRAINED:.0%} of the neurons. One greedy text is "
                "one sample, not a measurement: on some prompts either model loops or drifts, so read several.")
    for p in DOC_PRESETS.values():
        cols = st.columns(2)
        for col, model in zip(cols, (TWIN, DEMO_MODEL)):
            with col:
                show_continuation(spec(model=model, prompt=p), names=("sparse",), label=model)
    st.markdown(f"**The next word for the tour's prompt**, each model with all neurons and with {TRAINED:.0%}:")
    analyses = [runs[(m, PRESETS[DEMO_PRESET])] for m in (TWIN, DEMO_MODEL)]
    cols = st.columns(2)
    for col, a in zip(cols, analyses):
        with col:
            st.markdown(f"**{a.spec.model}**")
            show(quality.next_token_plot(a, labels(TRAINED), x_max(*analyses)), key=f"tour_twin_{a.spec.model}")
    return "pages/compare.py", spec(model=TWIN)


def twin_table(claims: dict) -> list[dict]:
    """Held-out perplexity of both models with all neurons and at the trained density (claims.json)."""
    rows = []
    for model, how in ((TWIN, "all neurons"), (DEMO_MODEL, f"{TRAINED:.0%} of them")):
        full, part = cl.find(claims, model, "dense"), cl.find(claims, model, "topk", TRAINED)
        rows.append({"model": f"{model} (trained with {how})", "all neurons": tt.ppl(full),
                     f"{TRAINED:.0%} of the neurons": tt.ppl(part), "change": tt.change(part, full)})
    return rows


def static() -> tuple[str, RunSpec]:
    run = spec()
    policies = ["topk", "static"]
    st.markdown(tt.static(claims(), TRAINED))
    if get_calibration(cached_model(DEMO_MODEL), train=False) is None:
        if not work_button("Prepare the static policy", key="tour_calibrate", note="The static policy first needs "
                           "its neuron set, counted once on sample text and then stored on disk for every later "
                           "visit. The built-in models' sets ship with the app; this one no longer matches them, "
                           "and how long counting it takes depends on the machine: minutes on a small, busy server, "
                           "so prepare it before class."):
            policies = ["topk"]
    analyses = {p: cached_analysis(spec(policy=p)) for p in policies}
    c1, c2 = st.columns(2)
    with c1:
        show(routing.recall_by_policy(analyses), key="tour_recall")
        st.caption("*Oracle top-k* is, for each token, the set of its strongest neurons, found by computing every "
                   "one of them: what a perfect chooser would keep. topk's recall is 1 by definition: it is that set.")
    with c2:
        if "static" in analyses:
            a = analyses["static"]
            show(quality.next_token_plot(a, ("all neurons", f"static: the same {TRAINED:.0%} for every token"),
                                               x_max(a)), key="tour_static_next")
    return "pages/routing.py", run


WHOLE = 0.5                           # step 8: the whole-model density of scope all


@st.cache_resource(show_spinner=False, max_entries=2)
def layer_inputs(run: RunSpec, layer: int) -> dict:
    return wm.layer_inputs(cached_model(run.model), run, layer)


def whole_model() -> tuple[str, RunSpec]:
    mlp_run, all_run = spec(), spec(density=WHOLE, scope="all")
    mlp, every = cached_analysis(mlp_run), cached_analysis(all_run)
    c1, c2, c3 = st.columns(3)
    c1.metric("Weights read: MLP only", f"{mlp.model_density:.0%}", help=f"{TRAINED:.0%} of the MLP's neurons, "
              "attention whole: the share of all the layers' weights read per token (embeddings not counted).")
    c2.metric("Weights read: every projection", f"{every.model_density:.0%}", help="Density 0.5 on every "
              "projection's input (embeddings not counted).")
    c3.metric("How far the guesses moved (KL), every projection", f"{every.compare['kl']:.3f}",
              help="KL divergence, in plain words: how far the probabilities of every possible next token moved "
              "from those of the whole model, averaged over the prompt. 0 = not at all.")
    st.markdown(tt.whole_model(mlp.model_density, TRAINED, every.model_density, WHOLE))
    layer = every.n_layers // 2
    x, mask = layer_inputs(all_run, layer)["q"], wm.recorded_masks(every, layer)["q"]
    show(wm_figs.kept_map(x, mask, every.tokens, layer, "q", f"every projection at density {WHOLE:g}"),
         key="tour_kept_map")
    cal = wm.input_calibration(cached_model(DEMO_MODEL))
    if cal is None:
        show(wm_figs.allocation_heatmap(wm.measured_grid(every), WHOLE, "topk"), key="tour_allocation")
        st.caption("topk gives every projection the same share. Greedy allocation needs teal's calibration of "
                   "demo-lm: choose teal under scope all on the Whole model page once to make it.")
    else:
        grids = wm.allocation_grids(cal, WHOLE, "teal")
        show(wm_figs.allocation_heatmap(grids, WHOLE, "teal"), key="tour_allocation")
        mean = {k: sum(v) / len(v) for k, v in grids["error"].items()}
        st.markdown(tt.greedy(mean["uniform"], mean["greedy"]))
    return "pages/whole_model.py", all_run


NEXT_PAGES = (
    ("pages/firing.py", "Firing map", "every layer and token, in the neuron order you choose"),
    ("pages/density.py", "Density", "a sweep over all densities and policies"),
    ("pages/compare.py", "Dense vs sparse", "longer continuations, the cost in bytes and FLOPs"),
    ("pages/routing.py", "Routing", "all four policies, hot and cold neurons"),
    ("pages/whole_model.py", "Whole model", "every projection's input, not only the MLP's neurons"),
    ("pages/attribution.py", "Attribution", "which prompt tokens drive the next token"),
    ("pages/speed.py", "Speed", "what skipping neurons saves in time"),
)


def next_steps() -> None:
    for i, (page, title, what) in enumerate(NEXT_PAGES):
        c1, c2 = st.columns([1, 3])
        if c1.button(title, key=f"tour_next_{i}", on_click=use_settings, width="stretch",
                     args=(DEMO_MODEL, DEMO_PRESET, "topk", TRAINED)):
            st.switch_page(page, query_params={})
        c2.markdown(what)


STEPS = (
    Step("What is a neuron?",
         "Each of demo-lm's 4 layers has an MLP block of 1024 *neurons*: small units that each compute one "
         "number *h* for every token. Here all of them work (a *dense* run, nothing dropped): one row per token, one "
         "column per neuron, redder where the neuron's |h| (its value, sign ignored) is larger. (· in a token marks a "
         "space.) " + ENDOFTEXT, neuron),
    Step("Which neurons fire for each token?",
         f"demo-lm learned to work with only the strongest {TRAINED:.0%} of its neurons for each token (102 of "
         "1024); the skipped ones are grey-blue. Each token picks its own neurons; below, the chosen token's "
         "strongest neurons with all of them on (blue) and what the sparse run kept (orange).", firing),
    Step("What does density mean?",
         f"*Density* is the share of neurons used for each token: {TRAINED:g} means one in ten.", density),
    Step("The next word, with fewer neurons",
         "The model's ten best guesses for the next token, with all neurons (left) and with fewer (right), on one "
         "probability scale. Move the slider to drop more neurons; a grey bar is a guess the other side does not "
         "have.", next_token),
    Step("Writing on, with fewer neurons",
         f"Both versions continue the prompt for {N_NEW} tokens, always taking their most likely next token. "
         "Move the slider and see from where the text with fewer neurons goes its own way.", writing),
    Step("Trained sparse vs pruned afterwards",
         f"demo-lm-dense learned from the same text with all its neurons; demo-lm learned while using only "
         f"{TRAINED:.0%} of them. Both now keep only {TRAINED:.0%}: which one copes better? The answer rests on "
         "measurements, not on one text.", twin),
    Step("Dynamic vs static",
         "*Dynamic* sparsity picks new neurons for every token (topk: the strongest ones). *Static* keeps the "
         "same neurons for all tokens, those most often useful on sample text: plain pruning. *Recall* is the "
         "share of each token's strongest neurons a policy kept (1 = all).", static),
    Step("Every projection, not only the MLP",
         "So far only the MLP's neurons were skipped; the attention part of each layer read everything. A layer "
         "is made of *projections*: weight matrices that each turn a token's vector into another (q, k and v "
         "for attention's queries, keys and values, o for its output, gate, up and down in the MLP). Under *scope "
         "all*, every projection of every layer reads only the largest entries of its input for each token, "
         "and so only the matching columns of its weights. The density then counts all the weights of the layers' "
         "matrices read per token; the embeddings, which turn tokens into vectors and back, always stay whole and "
         "are not counted. *Greedy allocation* gives each projection its own share, less where skipping changes "
         "the layer's output least, so that the layer as a whole still reads the same share of its weights. "
         "Below, one projection's input: warm = kept, blue-grey = skipped.", whole_model),
    Step("Where to go next",
         "Every page of the app works on demo-lm and on your own prompts. Each button opens a page with the "
         f"tour's model, prompt and density {TRAINED:g} in the sidebar.", next_steps),
)


def current_step() -> int:
    """The URL's step in 1..len(STEPS): junk and values below 1 give 1, values past the end the last
    step; the URL is corrected to match."""
    raw = st.query_params.get("step")
    try:
        step = min(max(int(float(raw.strip())), 1), len(STEPS)) if raw else 1
    except (ValueError, OverflowError):
        step = 1
    if raw is not None and raw != str(step):
        st.query_params["step"] = str(step)
    return step


def go(step: int) -> None:
    st.query_params["step"] = str(step)


def open_in_app(page: str, run: RunSpec) -> None:
    preset = next(name for name, text in PRESETS.items() if text == run.prompt)
    if st.button("Open this in the app", icon=":material/open_in_new:", key="tour_open",
                 on_click=use_settings, args=(run.model, preset, run.policy, run.density, run.scope),
                 help="Put this step's model, prompt, policy and density in the sidebar and open the page."):
        st.switch_page(page, query_params={})


sidebar_only(SIDEBAR_NOTE)
n = current_step()
step = STEPS[n - 1]
st.header("Classroom tour")
c1, c2, c3 = st.columns([4, 1, 1])
c1.markdown(f"**Step {n} of {len(STEPS)}** · {step.title}")
c2.button("Back", key="tour_back", icon=":material/arrow_back:", disabled=n == 1, on_click=go, args=(n - 1,),
          width="stretch")
c3.button("Next", key="tour_next", icon=":material/arrow_forward:", disabled=n == len(STEPS), on_click=go,
          args=(n + 1,), width="stretch")
st.progress(n / len(STEPS))
st.subheader(step.title)
st.markdown(step.text)
st.caption(f"Prompt: {escape_markdown(PRESETS[DEMO_PRESET])}")
target = step.draw()
if target:
    open_in_app(*target)
