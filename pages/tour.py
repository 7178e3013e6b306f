"""Classroom tour: eight steps on demo-lm (models/demo) for a teacher in front of a class, from what
a neuron is to dynamic vs static sparsity. Each step shows the app's own figure with its settings
applied, computed from RunSpecs the tour builds (the user's sidebar stays as it was until "Open
this in the app"). The step lives in the URL (?step=4); a bad value shows step 1, past the end the
last step."""
from dataclasses import dataclass
from typing import Callable

import streamlit as st

from pages._shared import (DEMO_MODEL, DEMO_PRESET, PRESETS, cached_analysis, cached_model, show, sidebar_only,
                           use_settings, work_button)
from sam_viz import SWEEP_DENSITIES, RunSpec, greedy_continuation, mass_curve, plots, quality_plots, routing_plots
from sam_viz.text import continuation_html, escape_html, escape_markdown
from sparse_ops import get_calibration

TWIN = "demo-lm-dense"
TRAINED = 0.1                         # demo-lm's density in training: 102 of 1024 neurons per token
DROP = (0.5, 0.25, 0.1, 0.05)         # the densities the class can try in steps 4 and 5
N_NEW = 20                            # tokens each continuation writes
CALIBRATION_S = 40                    # first use of `static` on demo-lm here (2-core CPU), then stored


@dataclass(frozen=True)
class Step:
    title: str
    text: str
    draw: Callable[[], tuple[str, RunSpec] | None]     # renders; returns (page, spec) for "open in the app"


def spec(policy: str = "topk", density: float = TRAINED, model: str = DEMO_MODEL) -> RunSpec:
    return RunSpec(prompt=PRESETS[DEMO_PRESET], model=model, policy=policy, density=density)


@st.cache_data(show_spinner=False, max_entries=32)
def continuation(run: RunSpec) -> dict:
    return greedy_continuation(cached_model(run.model), run, N_NEW)


def show_continuation(run: RunSpec, names=("dense", "sparse")) -> None:
    with st.spinner(f"Writing {N_NEW} tokens with {escape_markdown(run.model)}..."):
        c = continuation(run)
    labels = {"dense": "All neurons", "sparse": f"{run.density:.0%} of the neurons"}
    prompt = f'<span style="color: grey">{escape_html(run.prompt)}</span>'
    for name in names:
        st.markdown(f"**{labels[name]}:** {prompt}{continuation_html(c[name], c['first_divergence'])}",
                    unsafe_allow_html=True)
    if "dense" in names and "sparse" in names:
        first = c["first_divergence"]
        st.caption("The two texts are the same." if first is None else
                   f"The highlighted token is where the texts first differ (token {first + 1} of {N_NEW}).")


def agreement(a) -> None:
    c1, c2 = st.columns(2)
    c1.metric("Same first choice as all neurons", f"{a.compare['top1_agreement']:.0%}",
              help="Over every position of the prompt: how often the most likely next token is the same.")
    c2.metric("Difference in the guesses (KL)", f"{a.compare['kl']:.3f}",
              help="KL divergence of the next-token probabilities from the dense ones: 0 = identical.")


def layer_and_token(a) -> tuple[int, int]:
    c1, c2 = st.columns([1, 3])
    layer = c1.number_input("Layer", 0, a.n_layers - 1, a.n_layers // 2, key="tour_layer", bind="query-params")
    token = c2.selectbox("Token", range(len(a.tokens)), index=len(a.tokens) - 1, key="tour_token",
                         bind="query-params", format_func=lambda i: f"{i}: {a.tokens[i]}")
    return int(layer), int(token)


def density_choice() -> float:
    return st.select_slider("Density: the share of neurons kept", DROP, value=TRAINED, key="tour_density",
                            bind="query-params", format_func=lambda d: f"{d:g}")


def neuron() -> tuple[str, RunSpec]:
    run = spec("dense", 1.0)
    a = cached_analysis(run)
    layer, _ = layer_and_token(a)
    show(plots.firing_heatmap(a, layer), key="tour_heatmap_dense")
    return "pages/firing.py", run


def firing() -> tuple[str, RunSpec]:
    a = cached_analysis(spec())
    layer, token = layer_and_token(a)
    show(plots.firing_heatmap(a, layer), key="tour_heatmap")
    show(plots.token_neurons(a, layer, token), key="tour_token_neurons")
    return "pages/firing.py", a.spec


def density() -> tuple[str, RunSpec]:
    a = cached_analysis(spec())
    c1, c2 = st.columns(2)
    with c1:
        show(quality_plots.density_per_layer(a), key="tour_density_layers")
    with c2:
        show(quality_plots.mass_curve_plot(mass_curve(a, SWEEP_DENSITIES), SWEEP_DENSITIES), key="tour_mass_curve")
    return "pages/density.py", a.spec


def next_token() -> tuple[str, RunSpec]:
    a = cached_analysis(spec(density=density_choice()))
    show(quality_plots.next_token_plot(a), key="tour_next_tokens")
    agreement(a)
    return "pages/compare.py", a.spec


def writing() -> tuple[str, RunSpec]:
    run = spec(density=density_choice())
    show_continuation(run)
    return "pages/compare.py", run


def twin() -> tuple[str, RunSpec]:
    cols = st.columns(2)
    for col, model, title in ((cols[0], TWIN, "demo-lm-dense: trained with all neurons"),
                              (cols[1], DEMO_MODEL, f"demo-lm: trained with {TRAINED:.0%} of them")):
        with col:
            st.markdown(f"**{title}**")
            a = cached_analysis(spec(model=model))
            show(quality_plots.next_token_plot(a), key=f"tour_twin_{model}")
            agreement(a)
            show_continuation(a.spec, names=("sparse",))
    return "pages/compare.py", spec(model=TWIN)


def static() -> tuple[str, RunSpec]:
    run = spec()
    policies = ["topk", "static"]
    if get_calibration(cached_model(DEMO_MODEL), train=False) is None:
        if not work_button("Prepare the static policy", key="tour_calibrate", note="The static policy first needs "
                           f"its neuron set, counted once on sample text: about {CALIBRATION_S} s here, then stored "
                           "on disk for every later visit."):
            policies = ["topk"]
    analyses = {p: cached_analysis(spec(policy=p)) for p in policies}
    c1, c2 = st.columns(2)
    with c1:
        show(routing_plots.recall_by_policy(analyses), key="tour_recall")
        st.caption("topk's recall is 1 by definition: it keeps exactly each token's strongest neurons.")
    with c2:
        if "static" in analyses:
            show(quality_plots.next_token_plot(analyses["static"]), key="tour_static_next")
    return "pages/routing.py", run


NEXT_PAGES = (
    ("pages/firing.py", "Firing map", "every layer and token, in the neuron order you choose"),
    ("pages/density.py", "Density", "a sweep over all densities and policies"),
    ("pages/compare.py", "Dense vs sparse", "longer continuations, the cost in bytes and FLOPs"),
    ("pages/routing.py", "Routing", "all four policies, hot and cold neurons"),
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
         "number for every token. Here all of them work (the *dense* model): one row per token, one column per "
         "neuron, redder where the neuron's value is larger. (␣ in a token marks a space.)", neuron),
    Step("Which neurons fire for each token?",
         f"demo-lm learned to work with only the strongest {TRAINED:.0%} of its neurons for each token (102 of "
         "1024); the skipped ones are grey-blue. Each token picks its own neurons; below, the chosen token's "
         "strongest neurons with all of them on (blue) and what the sparse run kept (orange).", firing),
    Step("What does density mean?",
         f"*Density* is the share of neurons computed for each token: {TRAINED:g} means one in ten, so a tenth "
         "of the MLP's work. The kept neurons are the strongest, so they keep far more than a tenth of the "
         "total activity (*mass kept*, the sum of their absolute values).", density),
    Step("The next word, with fewer neurons",
         "The model's ten best guesses for the next token, with all neurons (left) and with fewer (right). "
         "Move the slider to drop more neurons; a grey bar is a guess the other side does not have.", next_token),
    Step("Writing on, with fewer neurons",
         f"Both versions continue the prompt for {N_NEW} tokens, always taking their most likely next token. "
         "Move the slider and see from where the text with fewer neurons goes its own way.", writing),
    Step("Trained sparse vs pruned afterwards",
         f"demo-lm-dense learned from the same text with all its neurons; demo-lm learned while using only "
         f"{TRAINED:.0%} of them. Here both keep only {TRAINED:.0%}: which one keeps its guesses and its text?",
         twin),
    Step("Dynamic vs static",
         "*Dynamic* sparsity picks new neurons for every token (topk: the strongest ones). *Static* keeps the "
         "same neurons for all tokens, those most often useful on sample text: plain pruning. *Recall* is the "
         "share of each token's strongest neurons a policy kept (1 = all).", static),
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
                 on_click=use_settings, args=(run.model, preset, run.policy, run.density),
                 help="Put this step's model, prompt, policy and density in the sidebar and open the page."):
        st.switch_page(page, query_params={})


sidebar_only()
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
