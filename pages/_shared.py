"""UI helpers shared by app.py and the pages: cached models and analyses, the sidebar, the share
link, and small widgets. Streamlit lives here and in the pages only; all computing is sam_viz's."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlencode

import streamlit as st

from models import BUILTIN_SPECS, DEFAULT_MODEL, allowed_roots
from sam_viz import Analysis, InputError, LoadedModel, RunSpec, analyze, load_model
from sam_viz.store import RunStore
from sam_viz.text import escape_markdown
from sparse_ops import POLICIES, available_kernels

PRESETS = {
    "Fox": "The quick brown fox jumps over the lazy dog.",
    "Science": "Photosynthesis turns sunlight, water and carbon dioxide into sugar. Plants release oxygen.",
    "Story": "Once upon a time, a young girl found a map in her grandmother's attic. It led to the sea.",
    "Code": "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Facts": "Paris is the capital of France. The Nile is the longest river in Africa. Water boils at 100 degrees.",
}
DEFAULT_PROMPT = PRESETS["Fox"]
PAGE_KEYS = ("layer", "token", "order", "freq")          # page selections that also live in the URL
PAGE_PATHS = ("density", "compare", "routing", "attribution", "speed", "runs")   # the firing map is the default page, at /
ANALYSIS_CACHE_SIZE = 16


@dataclass
class Context:
    """What every page draws from: the run's spec, its analysis, and (live runs only) the model."""
    spec: RunSpec
    analysis: Analysis
    run_id: str | None = None              # set when the view is a saved run

    def model(self) -> LoadedModel:
        """The loaded model, for on-demand work (sweep, continuation); loaded lazily."""
        with st.spinner(f"Loading {escape_markdown(self.spec.model)}..."):
            return cached_model(self.spec.model)


def navigation():
    """The app's page config and pages; a page's url path is its file name (/density), the firing
    map is the default page (/)."""
    st.set_page_config(page_title="sam-viz", page_icon=":material/neurology:", layout="wide")
    return st.navigation([
        st.Page("pages/firing.py", title="Firing map", icon=":material/grid_on:", default=True),
        st.Page("pages/density.py", title="Density", icon=":material/area_chart:"),
        st.Page("pages/compare.py", title="Dense vs sparse", icon=":material/compare:"),
        st.Page("pages/routing.py", title="Routing", icon=":material/alt_route:"),
        st.Page("pages/attribution.py", title="Attribution", icon=":material/insights:"),
        st.Page("pages/speed.py", title="Speed", icon=":material/speed:"),
        st.Page("pages/claims.py", title="Demo LM: the claim", icon=":material/fact_check:"),
        st.Page("pages/runs.py", title="Runs and sharing", icon=":material/share:"),
    ])


def _legacy_router() -> bool:
    """True while Streamlit still routes by the pages/ folder: on a fresh server, until app.py has
    called st.navigation once, a deep link such as /density runs pages/density.py on its own."""
    from streamlit.runtime.pages_manager import PagesManager

    return bool(PagesManager.uses_pages_directory)


def page_context() -> Context:
    """Every page starts here: the shared sidebar (bound to the URL) and the analysis it asks for.
    Shows the one-sentence error and stops the page when the input is bad."""
    if _legacy_router():                   # hand over to the app's own navigation, then stop here
        navigation().run()
        st.stop()
    ctx = resolve_context()
    if ctx is None:
        st.stop()
    st.session_state["ctx"] = ctx
    return ctx


@st.cache_resource(show_spinner=False)
def cached_model(spec: str) -> LoadedModel:
    return load_model(spec)


@st.cache_resource(show_spinner=False)
def _analysis_cache() -> tuple[OrderedDict, threading.Lock]:
    return OrderedDict(), threading.Lock()


def run_store() -> RunStore:
    """The run store at SAM_VIZ_RUN_DB (default ./runs/runs.sqlite), one per path per process."""
    return _run_store(os.environ.get("SAM_VIZ_RUN_DB", ""))


@st.cache_resource(show_spinner=False)
def _run_store(path: str) -> RunStore:
    return RunStore(path or None)


def cached_analysis(spec: RunSpec) -> Analysis:
    """One Analysis per RunSpec, shared by all sessions (LRU); progress shown while computing."""
    cache, lock = _analysis_cache()
    with lock:
        if spec in cache:
            cache.move_to_end(spec)
            return cache[spec]
    with st.spinner(f"Loading {escape_markdown(spec.model)}..."):
        loaded = cached_model(spec.model)
    with st.status(f"Analyzing the prompt on {escape_markdown(spec.model)}...", expanded=False) as status:
        bar = st.progress(0.0)
        result = analyze(loaded, spec, progress=lambda frac, text: bar.progress(frac, text=text))
        status.update(label=f"Analyzed {len(result.tokens)} tokens in {result.timings_ms['total']:.0f} ms",
                      state="complete")
    with lock:
        cache[spec] = result
        while len(cache) > ANALYSIS_CACHE_SIZE:
            cache.popitem(last=False)
    return result


def _apply_saved_spec(spec: RunSpec) -> None:
    """Make the sidebar show a saved run's settings (before its widgets are drawn)."""
    for key in ("model", "prompt", "policy", "density", "kernel"):
        st.session_state[key] = getattr(spec, key)


def _use_checkpoint() -> None:
    path = st.session_state.get("ckpt_path", "").strip()
    if path:
        st.session_state["model"] = path


def _use_preset() -> None:
    name = st.session_state.get("preset")
    if name in PRESETS:
        st.session_state["prompt"] = PRESETS[name]


URL_CHOICES = ("policy", "density", "kernel")     # bound widgets that drop a URL value they cannot take


def _url_not_taken(raw: dict[str, str | None]) -> list[str]:
    """One line per value the link asked for that a bound widget did not take: Streamlit drops an
    unknown policy, a density off the slider or a word where a number goes without a word."""
    out = []
    for key in URL_CHOICES:
        want, got = raw.get(key), st.session_state.get(key)
        if want is None:
            continue
        if key == "density":
            try:
                ok = abs(float(want) - float(got)) < 1e-9
            except (TypeError, ValueError):
                ok = False
            shown = f"{got:g}" if isinstance(got, float) else str(got)
        else:
            ok, shown = want == str(got), str(got)
        if not ok:
            out.append(f"The link's {key} '{escape_markdown(want[:40])}' is not one this app can use; "
                       f"showing {key} {shown}.")
    return out


def sidebar() -> RunSpec:
    """The shared sidebar, bound to the URL; raises InputError for a bad combination."""
    raw = {key: st.query_params.get(key) for key in URL_CHOICES}   # before the widgets take (or drop) them
    sb = st.sidebar
    sb.selectbox("Model", list(BUILTIN_SPECS), key="model", bind="query-params", accept_new_options=True,
                 help="A built-in model, or type a checkpoint directory under an allowed root.")
    with sb.expander("Checkpoint directory"):
        st.text_input("Path", key="ckpt_path", placeholder="./checkpoints/my-model")
        st.button("Use this checkpoint", on_click=_use_checkpoint)
        st.caption("Allowed roots: " + ", ".join(f"`{r}`" for r in allowed_roots()))
    sb.selectbox("Preset prompt", list(PRESETS), index=None, key="preset", on_change=_use_preset,
                 placeholder="Pick a preset...")
    sb.text_area("Prompt", DEFAULT_PROMPT, key="prompt", bind="query-params", max_chars=20_000, height=120)
    sb.selectbox("Policy", list(POLICIES), index=list(POLICIES).index("topk"), key="policy",
                 bind="query-params", help="topk: the k largest |h| per token (oracle). threshold: "
                 "|act(gate)| above a per-layer value calibrated on sample prompts. dense: every neuron.")
    sb.slider("Density", 0.05, 1.0, 0.5, 0.05, key="density", bind="query-params",
              help="Share of each MLP's neurons computed per token.")
    sb.selectbox("Kernel", available_kernels(), key="kernel", bind="query-params")
    for line in _url_not_taken(raw):
        st.warning(line)
    s = st.session_state
    return RunSpec(prompt=s["prompt"], model=s["model"] or DEFAULT_MODEL, policy=s["policy"],
                   density=s["density"], kernel=s["kernel"])


def resolve_context() -> Context | None:
    """Saved run (?run=<id>) or live analysis of the sidebar's spec; None after showing an error."""
    run_id = st.query_params.get("run")
    saved = None
    if run_id:
        saved = run_store().load(run_id)
        if saved is None:
            st.error(f"There is no saved run with id '{escape_markdown(run_id[:40])}'; "
                     "showing a live analysis instead.")
            del st.query_params["run"]
            run_id = None
        elif st.session_state.get("_opened_run") != run_id:
            _apply_saved_spec(saved.spec)
            st.session_state["_opened_run"] = run_id
    try:
        spec = sidebar()
        if saved is not None and spec == saved.spec:
            return Context(spec=spec, analysis=saved, run_id=run_id)
        if run_id:
            del st.query_params["run"]           # settings changed: this is no longer the saved run
        return Context(spec=spec, analysis=cached_analysis(spec))
    except InputError as exc:
        st.error(escape_markdown(str(exc)))
        return None


def share_url(ctx: Context, page: str = "", run_id: str | None = None) -> str:
    """A URL that reproduces the current view: a saved run's id, or every setting."""
    base = (st.context.url or "http://localhost:8501/").split("?")[0].rstrip("/")
    if base.rsplit("/", 1)[-1] in PAGE_PATHS:
        base = base.rsplit("/", 1)[0]
    run_id = run_id or ctx.run_id
    if run_id:
        params = {"run": run_id}
    else:
        s = ctx.spec
        params = {"model": s.model, "prompt": s.prompt, "policy": s.policy, "density": f"{s.density:g}",
                  "kernel": s.kernel}
    params.update({k: st.session_state[k] for k in PAGE_KEYS if st.session_state.get(k) is not None})
    return f"{base}/{page}?{urlencode(params)}"


def explain(markdown: str) -> None:
    with st.expander("What am I looking at?"):
        st.markdown(markdown)


def show(plot, key: str | None = None) -> None:
    """A sam_viz.plots.Plot: the figure, and what was reduced to fit the browser, if anything. The
    modebar shows on hover only, in the band the figures keep free above their titles."""
    st.plotly_chart(plot.fig, width="stretch", key=key, config={"displayModeBar": "hover", "displaylogo": False})
    if plot.note:
        st.caption(plot.note)


def cost_delta(sparse: float, dense: float, dense_text: str) -> dict:
    """st.metric keywords for a cost (bytes, FLOPs, time) against dense: the signed change, so that a
    decrease points down in green and an increase up in red; no arrow when it rounds to no change."""
    change = sparse / dense - 1 if dense else 0.0
    if round(change, 2) == 0:
        return dict(delta=f"same as dense ({dense_text})", delta_color="off", delta_arrow="off")
    return dict(delta=f"{change:+.0%} vs dense ({dense_text})", delta_color="inverse")


def layer_picker(analysis: Analysis) -> int:
    return st.number_input("Layer", 0, analysis.n_layers - 1, 0, key="layer", bind="query-params")


def token_picker(analysis: Analysis) -> int:
    labels = [f"{i}: {t}" for i, t in enumerate(analysis.tokens)]
    return st.selectbox("Token", range(len(labels)), format_func=lambda i: labels[i], key="token",
                        bind="query-params")
