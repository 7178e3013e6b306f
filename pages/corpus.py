"""Corpus: how a model routes over a whole corpus (a profile: `python -m sam_viz profile`), and one
neuron's page (top contexts, quantile samples, histogram, logit effects, correlated neurons).
`?profile=<id>&layer=&neuron=` reopens a neuron's page; showing a profile loads no model."""
import os

import streamlit as st

from pages._shared import explain, page_link, progress_bar, show, sidebar_only
from sam_viz import InputError
from sam_viz.figures import corpus
from sam_viz.profile import list_profiles, open_profile
from sam_viz.profile.view import context_prompt, marked_pieces
from sam_viz.text import continuation_html, escape_markdown

LINK_KEYS = ("profile", "layer", "neuron")


@st.cache_resource(max_entries=4, show_spinner=False)
def cached_profile(profile_id: str, root: str):
    """One Profile per id and folder, shared by the sessions: its tables are read once."""
    return open_profile(profile_id, root or None)


def new_link() -> dict | None:
    """The link's profile, layer and neuron when the URL brings new ones (first load, a link
    followed), else None: the page's own widgets hold the view."""
    raw = {k: st.query_params.get(k) for k in LINK_KEYS}
    if raw == st.session_state.get("_corpus_url"):
        return None
    st.session_state["_corpus_url"] = raw
    return raw if any(v is not None for v in raw.values()) else None


def link_number(raw: str | None, what: str, n: int) -> int | None:
    """A link's layer or neuron within 0..n-1, or None after a warning saying what is shown instead."""
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        st.warning(f"The link's {what} '{escape_markdown(raw[:40])}' is not a number; showing {what} 0.")
        return 0
    if not 0 <= value < n:
        st.warning(f"The link's {what} {value} is out of range: this profile has {n} {what}s"
                   f"{' per layer' if what == 'neuron' else ''} (0 to {n - 1}); showing {what} 0.")
        return 0
    return value


def make_profile(spec) -> None:
    """Profile the built-in text on the sidebar's model, with a progress bar; the new one is then picked."""
    from sam_viz.profile import build_profile      # the writer; imported only when a profile is made

    label = f"Profiling {escape_markdown(spec.model)} on the built-in text"
    with progress_bar(label) as step:
        try:
            manifest = build_profile(spec.model, "builtin:calibration", policy=spec.policy, density=spec.density,
                                     kernel=spec.kernel, progress=lambda done, total, message: step(
                                         min(1.0, done / max(1, total)),
                                         f"{done:,} of {total:,} tokens · {escape_markdown(message)}"))
        except InputError as exc:
            st.error(escape_markdown(str(exc)))
            return
    st.session_state["_corpus_new"] = manifest["id"]
    st.rerun()


def profile_label(m: dict) -> str:
    s = m.get("settings", {})
    return (f"{m['id']} · {m['model']} · {m.get('corpus', {}).get('source', '?')} · {m.get('tokens', 0):,} tokens · "
            f"{s.get('policy', '?')} {s.get('density', 0):g} · {str(m.get('created', ''))[:16]}")


def context_row(tokens, focus: int, value: float, where: str, prof, layer: int, key: str) -> None:
    """One context, the firing token marked, and a button that opens it in the firing map."""
    left, right = st.columns([4, 1], vertical_alignment="center")
    left.markdown(f"<small>{value:+.3f} · {escape_markdown(where)}</small> &nbsp; "
                  f"{continuation_html(*marked_pieces(list(tokens), int(focus)))}", unsafe_allow_html=True)
    prompt, token = context_prompt(list(tokens), int(focus))
    token += prof.manifest["kind"] == "encoder"           # the [CLS] an encoder's prompt starts with
    settings = {"model": prof.manifest["model"], "prompt": prompt, "policy": prof.settings["policy"],
                "density": float(prof.settings["density"]), "layer": int(layer), "token": int(token)}
    right.button("Open in firing map", icon=":material/grid_on:", key=key, on_click=open_context, args=(settings,),
                 help="The firing map of this text, with the profile's model, policy and density, at this "
                      "layer and token.")


def open_context(settings: dict) -> None:
    """The context's settings go to the sidebar's widgets and the firing map's selections in the session,
    which a page switch keeps; the URL is then written from them by the firing map's own widgets. (A
    page link carrying them as URL parameters lost some on the way: in about 4 runs of 5 after another
    session, the browser's rerun request brought the prompt and the density back at their defaults.)"""
    s = st.session_state
    s.update(settings)
    s["_open_firing"] = True


def show_or_say(plot, key: str) -> bool:
    """The figure when it has data (True); else only the sentence saying why (`show`)."""
    show(plot, key=key)
    return bool(plot.fig.data)


def overview(prof) -> None:
    table = prof.layer_table()
    units = prof.n_layers * prof.units
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Tokens profiled", f"{prof.manifest.get('tokens', 0):,}")
    c2.metric("Neurons that cover 80% of firing", f"{prof.hot_curve().covering(0.8):.1%}")
    c3.metric("Dead neurons", f"{int(table['dead'].sum()):,} of {units:,}", help="Never in the oracle top-k.")
    c4.metric("Always on", f"{int(table['always_on'].sum()):,}", help="In the oracle top-k on every token they saw.")
    left, right = st.columns(2)
    with left:
        show(corpus.hot_curves(prof), key="hot_curves")
    with right:
        show(corpus.layer_quality(prof), key="layer_quality")
    show(corpus.firing_heatmap(prof), key="firing_matrix")
    st.dataframe(table[["layer", "tokens", "density", "recall", "precision", "mass_kept", "dead", "always_on"]],
                 hide_index=True, column_config={
                     "density": st.column_config.NumberColumn("density", format="%.3f"),
                     "recall": st.column_config.NumberColumn("recall", format="%.3f"),
                     "precision": st.column_config.NumberColumn("precision", format="%.3f"),
                     "mass_kept": st.column_config.NumberColumn("mass kept", format="%.3f"),
                     "always_on": st.column_config.NumberColumn("always on")})


def neuron_page(prof, layer: int, unit: int) -> None:
    v = prof.neuron(layer, unit)
    s = prof.settings
    c1, c2, c3, c4 = st.columns(4)
    c1.metric(f"Fires (oracle top-k at {s['density']:g})", f"{v.fire_freq:.1%}", help="Share of its tokens.")
    c2.metric(f"Selected by {s['policy']}", f"{v.select_freq:.1%}")
    c3.metric("Mean |h|", f"{v.mean_abs:.3g}")
    c4.metric("Max |h|", f"{v.max_abs:.3g}")
    if v.expert is not None:
        st.caption(f"Expert {v.expert}, neuron {unit % prof.d_ff}: computed on the {v.tokens:,} tokens routed to it.")
    st.subheader("Top contexts")
    top = v.band("top")
    if top.empty:
        st.caption("No contexts stored for this neuron (it never fired).")
    for r in top.itertuples():
        context_row(r.tokens, r.focus, r.value, f"doc {r.doc}, token {r.pos}", prof, layer, f"open_top_{r.Index}")
    bands = prof.manifest.get("quantile_bands") or []
    with st.expander("Quantile samples: contexts from each band of |h|"):
        for i, band in enumerate(bands):
            rows = v.band(f"q{i}")
            st.markdown(f"**|h| from {band[0]:.0%} to {band[1]:.0%} of its max** ({len(rows)} samples)")
            for r in rows.itertuples():
                context_row(r.tokens, r.focus, r.value, f"doc {r.doc}, token {r.pos}", prof, layer, f"open_top_{r.Index}")
    left, right = st.columns(2)
    with left:
        show_or_say(corpus.neuron_histogram(v), key="neuron_histogram")
    with right:
        if show_or_say(corpus.logit_effects(v), key="logit_effects") and prof.manifest.get("logit_effect"):
            st.caption(f"Final norm: {escape_markdown(prof.manifest['logit_effect'])}")
    st.subheader("Neurons that fire with it")
    st.caption(escape_markdown(v.cofire_note))
    if v.correlated is None:
        return
    for r in v.correlated.itertuples():
        page_link("pages/corpus.py", f"neuron {r.unit} · phi {r.phi:+.2f} · together on {r.both:,} of {r.tokens:,} "
                  f"tokens", query_params={"profile": prof.id, "layer": layer, "neuron": int(r.unit)})


if st.session_state.pop("_open_firing", False):                 # "Open in firing map" was clicked
    st.switch_page("pages/firing.py")
spec = sidebar_only()
st.header("Corpus")
explain("""
A **profile** runs the model over a whole corpus, densely and with a sparsity policy, and keeps per
neuron how often it fired (was in the oracle top-k), its activations and the contexts that made it
fire; per layer how well the policy recalled the oracle.

- **Hot neurons** (PowerInfer's Fig. 4): sort the neurons by how often they fire; the curve says
  what share of all firing the hottest X% of them carry. Far above the diagonal = concentrated.
- **Firing frequency**: one row per layer, each layer's neurons sorted, hottest on the left. Dead
  neurons (never fire) are dark on the right.
- **Neuron**: the contexts where one neuron fires hardest (firing token marked), samples from each
  band of its activation, its histogram, the tokens it pushes up and down (causal LMs), and the
  neurons that fire on the same tokens (phi coefficient: 1 = always together, -1 = never).
""")
link = new_link()
if "_corpus_new" in st.session_state:
    st.session_state["corpus_profile"] = st.session_state.pop("_corpus_new")
profiles = list_profiles()
with st.expander("Make a profile of the built-in text", expanded=not profiles):
    if spec is None:
        st.caption("Fix the sidebar's settings first.")
    else:
        st.caption(f"The sidebar's model ({escape_markdown(spec.model)}), {spec.policy} at density "
                   f"{spec.density:g}, over the built-in calibration text. The command line profiles any "
                   "corpus: `python -m sam_viz profile --model SPEC --corpus FILE`.")
        if st.button(f"Profile {escape_markdown(spec.model)}", type="primary"):
            make_profile(spec)
ids = [m["id"] for m in profiles]
if link and link["profile"] is not None and link["profile"] not in ids:
    try:
        open_profile(link["profile"])
        st.error(f"Profile '{escape_markdown(link['profile'])}' is not complete yet.")
    except InputError as exc:
        st.error(escape_markdown(str(exc)))
elif link and link["profile"] is not None:
    st.session_state["corpus_profile"] = link["profile"]
if not profiles:
    st.info("No profiles yet: make one above.")
    st.stop()
by_id = {m["id"]: m for m in profiles}
pid = st.selectbox("Profile", ids, format_func=lambda i: profile_label(by_id[i]), key="corpus_profile")
try:
    prof = cached_profile(pid, os.environ.get("SAM_VIZ_PROFILE_DIR", ""))
    prof.layer_table()
except InputError as exc:
    st.error(escape_markdown(str(exc)))
    st.stop()
m = prof.manifest
st.caption(f"{escape_markdown(m['model'])} · {m['kind']} · {prof.n_layers} layers × {prof.units:,} neurons · "
           f"corpus {escape_markdown(m.get('corpus', {}).get('source', '?'))} · {m.get('engine', '?')} engine · "
           f"{m.get('wall_s', 0):.0f} s")
for key, n in (("corpus_layer", prof.n_layers), ("corpus_neuron", prof.units)):
    if not 0 <= st.session_state.get(key, 0) < n:
        st.session_state[key] = 0
if link:
    for key, what, n in (("corpus_layer", "layer", prof.n_layers), ("corpus_neuron", "neuron", prof.units)):
        value = link_number(link[what], what, n)
        if value is not None:
            st.session_state[key] = value
if link and link["neuron"] is not None:
    st.session_state["corpus_tab"] = "Neuron"
tab_overview, tab_neuron = st.tabs(["Overview", "Neuron"], key="corpus_tab", on_change="rerun")
written = {"profile": prof.id, "layer": None, "neuron": None}
if tab_overview.open:
    with tab_overview:
        overview(prof)
if tab_neuron.open:
    with tab_neuron:
        c1, c2 = st.columns(2)
        layer = c1.number_input("Layer", 0, prof.n_layers - 1, key="corpus_layer")
        unit = c2.number_input("Neuron", 0, prof.units - 1, key="corpus_neuron",
                               help="For MoE models: expert × neurons per expert + neuron, as in the firing map.")
        written.update(layer=str(layer), neuron=str(unit))
        neuron_page(prof, layer, unit)
for key, value in written.items():
    if value is None:
        st.query_params.pop(key, None)
    else:
        st.query_params[key] = value
st.session_state["_corpus_url"] = written
