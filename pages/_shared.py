"""UI helpers shared by app.py and the pages: cached models and analyses, the sidebar, the share
link, and small widgets. Streamlit lives here and in the pages only; all computing is sam_viz's."""
from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

# pandas whole before any figure: plotly's validators read it from sys.modules, where it is half-made
# while another session's thread imports it for the first time (AttributeError: no attribute 'Series')
import pandas  # noqa: F401
import streamlit as st
from streamlit.errors import StreamlitAPIException, StreamlitPageNotFoundError
from streamlit.runtime.scriptrunner import get_script_run_ctx

from sam_viz import (BUILTIN_SPECS, DEFAULT_MODEL, Analysis, InputError, KernelCannotCompute, LoadedModel, RunSpec,
                     allowed_roots, analyze, load_model)
from sam_viz.analysis import TooManyTokens, truncate_to_tokens
from sam_viz.spec import MAX_PROMPT_CHARS
from sam_viz.store import RunStore
from sam_viz.text import escape_markdown
from sam_viz.sparse_ops import (ALLOCATIONS, CALIBRATED, INPUT_CALIBRATED, POLICIES as ALL_POLICIES, SCOPE_POLICIES,
                                SCOPES, available_kernels, default_kernel, get_calibration, unavailable_kernels)

PRESETS = {
    "Fox": "The quick brown fox jumps over the lazy dog.",
    "Science": "Photosynthesis turns sunlight, water and carbon dioxide into sugar. Plants release oxygen.",
    "Story": "Once upon a time, a young girl found a map in her grandmother's attic. It led to the sea.",
    "Code": "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Facts": "Paris is the capital of France. The Nile is the longest river in Africa. Water boils at 100 degrees.",
}
DOC_PRESETS = {                       # suit demo-lm's training text, the Python documentation
    "Docs: open a file": "The :func:`open` function returns a file object, which",
    "Docs: a module": "This module provides functions for",
    "Docs: a missing file": "If the file does not exist,",
    "Docs: a new list": "   Return a new list containing",
    "Docs: exceptions": "   Raise a :exc:`ValueError` if",
}
PRESETS.update(DOC_PRESETS)
DEFAULT_PROMPT = PRESETS["Fox"]
DEMO_MODEL = "demo-lm"
DEMO_PRESET = "Docs: open a file"
PAGE_KEYS = ("layer", "token", "order", "freq", "query", "projection")  # page selections that also live in the URL
PAGE_PATHS = ("tour", "density", "compare", "routing", "whole_model", "attribution", "speed", "runs", "corpus")   # the firing map is at /
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
        st.Page("pages/tour.py", title="Classroom tour", icon=":material/school:"),
        st.Page("pages/density.py", title="Density", icon=":material/area_chart:"),
        st.Page("pages/compare.py", title="Dense vs sparse", icon=":material/compare:"),
        st.Page("pages/routing.py", title="Routing", icon=":material/alt_route:"),
        st.Page("pages/whole_model.py", title="Whole model", icon=":material/stacks:"),
        st.Page("pages/attribution.py", title="Attribution", icon=":material/insights:"),
        st.Page("pages/speed.py", title="Speed", icon=":material/speed:"),
        st.Page("pages/claims.py", title="Demo LM: the claim", icon=":material/fact_check:"),
        st.Page("pages/corpus.py", title="Corpus", icon=":material/library_books:"),
        st.Page("pages/runs.py", title="Runs and sharing", icon=":material/share:"),
    ])


def _legacy_router() -> bool:
    """True while Streamlit still routes by the pages/ folder: on a fresh server, until app.py has
    called st.navigation once, a deep link such as /density runs pages/density.py on its own."""
    from streamlit.runtime.pages_manager import PagesManager

    return bool(PagesManager.uses_pages_directory)


def _hand_over() -> None:
    if _legacy_router():                   # hand over to the app's own navigation, then stop here
        navigation().run()
        st.stop()
    ctx, s = get_script_run_ctx(), st.session_state
    page = ctx.page_script_hash if ctx else ""
    s["_switched"], s["_page"] = s.get("_page", page) != page, page


def _carry_page_keys() -> None:
    """On a page switch, the page selections (layer, ...) the last page held go to this one's widgets
    and its URL, unless the URL brings its own. Streamlit keeps a bound widget's value for a later page
    under its key, but only after the next page has drawn its own widget of that key at the default (a
    menu click from the firing map's layer to the routing page's)."""
    s = st.session_state
    if not s.get("_switched"):
        return
    for key in PAGE_KEYS:
        if s.get(key) is not None and key not in st.query_params:
            s[key] = s[key]
            if s[key] not in (0, ""):
                try:
                    st.query_params[key] = str(s[key])
                except StreamlitAPIException:      # still bound to the last page's widget, which keeps it
                    pass


def page_context() -> Context:
    """Every page starts here: the shared sidebar (bound to the URL) and the analysis it asks for.
    Shows the one-sentence error and stops the page when the input is bad."""
    _hand_over()
    _carry_page_keys()
    ctx = resolve_context()
    if ctx is None:
        st.stop()
    st.session_state["ctx"] = ctx
    if ctx.run_id:
        saved_run_line(ctx.run_id)
    return ctx


def saved_run_line(run_id: str) -> None:
    """The one line every page of a saved run shows, with the way back to a live analysis."""
    left, right = st.columns([6, 1], vertical_alignment="center")
    left.info(f"Saved run `{run_id}`: the stored analysis, shown without running the model. Changing a "
              "setting in the sidebar leaves it.", icon=":material/bookmark:")
    right.button("Analyse live", on_click=_leave_saved_run, help="Run this prompt and settings on the model "
                 "here, for what needs the model (sweep, continuation, timing, attribution).")


def _leave_saved_run() -> None:
    st.session_state.pop("_opened_run", None)
    if "run" in st.query_params:
        del st.query_params["run"]


def sidebar_only(note: str | None = None) -> RunSpec | None:
    """For a page that computes its own analyses (the tour): the shared sidebar, kept as the user
    set it, without analysing its spec, under `note` (what the page uses instead) and without the
    minilm hint; a bad setting is one sentence in the sidebar."""
    _hand_over()
    if note:
        st.sidebar.info(note, icon=":material/pause_circle:")
    try:
        return sidebar(hint=note is None)
    except InputError as exc:
        st.sidebar.error(escape_markdown(str(exc)))
        return None


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


@contextmanager
def progress_bar(label: str):
    """A progress bar for long work on the page, as a callback (fraction, text); it goes when the
    work ends, also when the work fails or the page stops."""
    box = st.empty()
    box.progress(0.0, text=label)
    try:
        yield lambda frac, text: box.progress(frac, text=f"{label}: {text}")
    finally:
        box.empty()


def cached_analysis(spec: RunSpec) -> Analysis:
    """One Analysis per RunSpec, shared by all sessions (LRU). A progress bar says what is being done
    (a first calibration of the model included) and goes when the work ends, also when it fails."""
    cache, lock = _analysis_cache()
    with lock:
        if spec in cache:
            cache.move_to_end(spec)
            return cache[spec]
    with st.spinner(f"Loading {escape_markdown(spec.model)}..."):
        loaded = cached_model(spec.model)
    box = st.empty()
    try:
        if spec.policy in CALIBRATED and spec.density < 1 and get_calibration(loaded, train=False) is None:
            get_calibration(loaded, progress=_calibration_progress(box, spec.model))
        result = analyze(loaded, spec, progress=lambda frac, text: box.progress(
            frac, text=f"Analysing the prompt on {escape_markdown(spec.model)}: {text}"))
    finally:
        box.empty()
    with lock:
        cache[spec] = result
        while len(cache) > ANALYSIS_CACHE_SIZE:
            cache.popitem(last=False)
    return result


def _calibration_progress(box, model: str):
    """Progress of a first calibration in `box`: the step in words, and the time left once it can
    be guessed from the share done."""
    start = time.monotonic()

    def show(frac: float, text: str) -> None:
        spent = time.monotonic() - start
        left = f"about {spent / frac * (1 - frac):.0f} s left" if frac >= 0.05 and spent > 1 else "once per model"
        box.progress(frac, text=f"Calibrating {escape_markdown(model)} for the first time ({left}): "
                                f"{text[:1].lower()}{text[1:]}")
    return show


def _apply_saved_spec(spec: RunSpec) -> None:
    """Make the sidebar show a saved run's settings (before its widgets are drawn)."""
    for key in ("model", "prompt", "scope", "policy", "density", "kernel", "allocation"):
        st.session_state[key] = getattr(spec, key)


def _use_checkpoint() -> None:
    path = st.session_state.get("ckpt_path", "").strip()
    if path:
        st.session_state["model"] = path


def _use_preset() -> None:
    name = st.session_state.get("preset")
    if name in PRESETS:
        st.session_state["prompt"] = PRESETS[name]


def use_settings(model: str, preset: str, policy: str | None = None, density: float | None = None,
                 scope: str | None = None) -> None:
    """Set the sidebar (as a callback, before its widgets are drawn): a model and a preset prompt,
    and a policy, density and scope when given."""
    s = st.session_state
    s["model"], s["preset"], s["prompt"] = model, preset, PRESETS[preset]
    if scope is not None:
        s["scope"] = scope
    if policy is not None:
        s["policy"] = policy
    if density is not None:
        s["density"] = density


def page_link(path: str, label: str, icon: str | None = None, query_params: dict | None = None) -> None:
    """st.page_link under the app's navigation; a plain relative link where a page script runs on its
    own, outside it (AppTest opens page scripts directly)."""
    try:
        st.page_link(path, label=label, icon=icon, query_params=query_params)
    except StreamlitPageNotFoundError:
        query = f"?{urlencode(query_params)}" if query_params else ""
        st.markdown(f"[{label}]({path.rsplit('/', 1)[-1].removesuffix('.py')}{query})")


def _demo_hint() -> None:
    """minilm is an encoder and writes no text: one click to the demo LM or the tour."""
    st.info("Want a model that writes text? Try demo-lm, a small language model trained here, or take "
            "the classroom tour.", icon=":material/school:")
    st.button("Try demo-lm", on_click=use_settings, args=(DEMO_MODEL, DEMO_PRESET),
              help=f"Switch the model to demo-lm and the prompt to: {PRESETS[DEMO_PRESET]}")
    page_link("pages/tour.py", "Take the classroom tour", icon=":material/school:")


URL_CHOICES = ("policy", "kernel", "scope")     # bound selectboxes that drop a URL value they cannot take
POLICIES = SCOPE_POLICIES["mlp"]        # the policies of the default scope (the Policy box offers its scope's)
SCOPE_HELP = ("mlp: the policy chooses each MLP's neurons; attention runs dense. all: it chooses, per token, the "
              "input entries of every projection of every block (q, k, v, o, gate, up, down); embeddings and the "
              "unembedding stay dense.")
DENSITY_MIN, DENSITY_MAX, DENSITY_STEP, DENSITY_DEFAULT = 0.05, 1.0, 0.05, 0.5     # the sidebar's slider


def root_names(roots) -> list[str]:
    """The allowed roots as a visitor may see them, without the server's folders: a folder under the
    app's working directory by its relative path, the Hugging Face cache by name, another by its last
    part."""
    from huggingface_hub import constants

    cwd, hub = Path.cwd().resolve(), Path(constants.HF_HUB_CACHE).expanduser().resolve()
    return ["the Hugging Face cache" if r == hub else f"`{r.relative_to(cwd) if r.is_relative_to(cwd) else r.name}`"
            for r in roots]


def _follow_link(raw: dict[str, str | None]) -> None:
    """A link followed from another page (st.page_link with settings) brings values the sidebar's
    widgets do not hold. Streamlit keeps the widgets' values then (they are the app's, not a page's):
    the link's usable ones go to them."""
    s = st.session_state
    link = {"model": raw["model"], "prompt": raw["prompt"] and raw["prompt"][:MAX_PROMPT_CHARS],
            "policy": raw["policy"] if raw["policy"] in POLICIES else None,
            "kernel": raw["kernel"] if raw["kernel"] in available_kernels() else None,
            "density": None if raw["density"] is None else link_density(raw["density"])[0]}
    for key, value in link.items():
        if value is not None and key in s and s[key] != value:
            s[key] = value


def _cut_prompt(link: str | None) -> int | None:
    """A prompt longer than the box takes, a paste or a link's, cut to it before the box is drawn (a box
    with max_chars refuses such a paste without a word); its length then."""
    if link is not None and len(link) > MAX_PROMPT_CHARS:
        try:
            st.query_params["prompt"] = link[:MAX_PROMPT_CHARS]
        except StreamlitAPIException:          # bound: the box holds the link's prompt, cut by _follow_link
            pass
    text = st.session_state.get("prompt")
    if text is None or len(text) <= MAX_PROMPT_CHARS:
        return len(link) if link is not None and len(link) > MAX_PROMPT_CHARS else None
    st.session_state["prompt"] = text[:MAX_PROMPT_CHARS]
    return len(text)


def _url_not_taken(raw: dict[str, str | None]) -> list[str]:
    """One line per choice the link asked for that a bound selectbox did not take: Streamlit drops an
    unknown policy or kernel without a word."""
    out = []
    for key in URL_CHOICES:
        want, got = raw.get(key), st.session_state.get(key)
        if key == "policy" and want in ALL_POLICIES:      # a policy of the other scope: _scope_notes says it
            continue
        if want is not None and want != str(got):
            why = unavailable_kernels().get(want) if key == "kernel" else None
            out.append(f"The link's {key} '{escape_markdown(want[:40])}' is not one this app can use"
                       f"{f' ({why})' if why else ''}; showing {key} {got}.")
    return out


def link_density(raw: str) -> tuple[float, str | None]:
    """The slider's value nearest to a link's density (on its 0.05 steps, within [0.05, 1]; the
    default for what is not a finite number), and a note when that is not what the link says."""
    try:
        number = float(raw)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        return DENSITY_DEFAULT, f"The link's density '{raw[:40]}' is not a number; analysing {DENSITY_DEFAULT:g}."
    value = round(round(min(DENSITY_MAX, max(DENSITY_MIN, number)) / DENSITY_STEP) * DENSITY_STEP, 2)
    if abs(number - value) < 1e-9:
        return value, None
    why = (f"is not on the slider's {DENSITY_STEP:g} steps" if DENSITY_MIN <= number <= DENSITY_MAX
           else f"is outside the slider's {DENSITY_MIN:g} to {DENSITY_MAX:g} range")
    return value, f"The link's density {raw[:40]} {why}; analysing {value:g}."


def _url_density(raw: str | None) -> tuple[float, str] | None:
    """(slider value, note) when a link's density is one the slider cannot show, else None.
    Streamlit keeps a value off the slider's steps (the slider shows the nearest step, the analysis
    would use the link's value) and drops one out of range or not a number for the default. Called
    before the slider binds the URL, so the URL can still be set to the value analysed. (Where
    Streamlit drops the link's value it also removes ours: the URL lacks `density` then, until the
    slider moves.)"""
    value, note = link_density(raw) if raw is not None else (None, None)
    if note is None:
        return None
    try:
        st.query_params["density"] = f"{value:g}"
    except StreamlitAPIException:          # the slider is bound already, and keeps the URL itself
        pass
    return value, note


@contextmanager
def app_wide():
    """Widgets made inside belong to the app, as if app.py drew them: one widget, and one URL binding,
    on every page. A widget a page draws is that page's: on a menu click Streamlit drops the URL
    params bound to it before the next page runs, and the next page draws its own at the default."""
    ctx = get_script_run_ctx()
    if ctx is None:
        yield
        return
    with ctx.run_with_active_hash(ctx.pages_manager.main_script_hash):
        yield


def sidebar(hint: bool = True) -> RunSpec:
    """The shared sidebar, bound to the URL (with the minilm hint unless `hint` is False); raises
    InputError for a bad combination."""
    with app_wide():
        return _sidebar(hint)


def _sidebar(hint: bool) -> RunSpec:
    raw = {key: st.query_params.get(key) for key in (*URL_CHOICES, "density", "prompt", "model", "allocation")}   # before the widgets take them
    if st.session_state.get("_switched"):
        _follow_link(raw)
        _follow_scope(raw)
    snapped = st.session_state.pop("_density_snap", None)       # a link's density, put on the slider's grid
    if snapped is not None:
        st.session_state["density"] = snapped[0]
    fix = None if snapped else _url_density(raw["density"])
    sb = st.sidebar
    sb.selectbox("Model", list(BUILTIN_SPECS), key="model", bind="query-params", accept_new_options=True,
                 help="A built-in model, or type a checkpoint directory under an allowed root.")
    if hint and (st.session_state.get("model") or DEFAULT_MODEL) == DEFAULT_MODEL:
        with sb:
            _demo_hint()
    with sb.expander("Checkpoint directory"):
        st.text_input("Path", key="ckpt_path", placeholder="./checkpoints/my-model")
        st.button("Use this checkpoint", on_click=_use_checkpoint)
        st.caption("Allowed roots: " + ", ".join(root_names(allowed_roots())))
    sb.selectbox("Preset prompt", list(PRESETS), index=None, key="preset", on_change=_use_preset,
                 placeholder="Pick a preset...")
    over = _cut_prompt(raw["prompt"])
    sb.text_area("Prompt", DEFAULT_PROMPT, key="prompt", bind="query-params", height=120)
    scope = sb.selectbox("Scope", SCOPES, key="scope", bind="query-params", help=SCOPE_HELP)
    policies = SCOPE_POLICIES[scope]
    policy = sb.selectbox("Policy", policies, index=policies.index("topk"), key="policy",
                          bind="query-params", help=POLICY_HELP[scope])
    if policy in INPUT_CALIBRATED:
        sb.selectbox("Allocation", ALLOCATIONS, index=ALLOCATIONS.index("greedy"), key="allocation",
                     bind="query-params", help=ALLOCATION_HELP)
    sb.slider("Density", DENSITY_MIN, DENSITY_MAX, DENSITY_DEFAULT, DENSITY_STEP, key="density",
              bind="query-params", help=DENSITY_HELP[scope])
    kernels, missing = available_kernels(), unavailable_kernels()
    sb.selectbox("Kernel", kernels, index=kernels.index(default_kernel()), key="kernel", bind="query-params",
                 help="cpu: the compiled kernel that reads only the selected rows. reference: plain torch, "
                 "computes every neuron and masks (the oracle in tests). triton: the same on a GPU.")
    if missing:
        sb.caption("Not offered here: " + "; ".join(f"`{k}` ({why})" for k, why in missing.items()) + ".")
    if len(st.session_state["prompt"]) > MAX_PROMPT_CHARS:      # a link's, taken by the box as it is: cut next run
        st.rerun()
    if over:
        st.warning(f"The prompt is {over:,} characters; the prompt box takes {MAX_PROMPT_CHARS:,}, so its first "
                   f"{MAX_PROMPT_CHARS:,} are analysed.")
    for line in _url_not_taken(raw) + _scope_notes(raw):
        st.warning(line)
    if fix and abs(st.session_state["density"] - fix[0]) > 1e-9:
        st.session_state["_density_snap"] = fix       # the slider took the link's value: give it ours
        st.rerun()
    if fix or snapped:
        st.warning((fix or snapped)[1])
    s = st.session_state
    return RunSpec(prompt=s["prompt"], model=s["model"] or DEFAULT_MODEL, policy=s["policy"],
                   density=s["density"], kernel=s["kernel"], scope=s["scope"],
                   allocation=s["allocation"] if s["policy"] in INPUT_CALIBRATED else RunSpec.allocation)


POLICY_HELP = {
    "mlp": "topk: the k largest |h| per token (oracle). threshold: |act(gate)| above a per-layer value calibrated "
           "on sample prompts. predictor: a small network guesses them from the MLP input. static: the same "
           "neurons for every token. dense: every neuron.",
    "all": "topk: the k largest |x_i| of each projection's input per token (Q-Sparse). teal: |x_i| above a "
           "threshold calibrated per layer and projection (TEAL). wina: |x_i| times the norm of W's column i above "
           "one (WINA). dense: every entry.",
}
ALLOCATION_HELP = ("uniform: every projection at the target density. greedy (TEAL): per block, lower first the "
                   "projections whose sparsity adds the least error to the block's output, weighted by their "
                   "weight counts, until the block reads the target share of its weights.")
DENSITY_HELP = {"mlp": "Share of each MLP's neurons computed per token.",
                "all": "Share of each block's matrix weights read per token (whole-model density; embeddings and "
                       "the unembedding, which stay dense, not counted)."}


def _follow_scope(raw: dict[str, str | None]) -> None:
    """_follow_link for the scope and allocation, and for a policy of the link's scope (which _follow_link,
    knowing the default scope's policies only, leaves)."""
    s = st.session_state
    scope = raw.get("scope") if raw.get("scope") in SCOPES else None
    if scope is not None and "scope" in s:
        s["scope"] = scope
    if raw.get("policy") in SCOPE_POLICIES[scope or s.get("scope") or "mlp"] and "policy" in s:
        s["policy"] = raw["policy"]
    if raw.get("allocation") in ALLOCATIONS and "allocation" in s:
        s["allocation"] = raw["allocation"]


def _scope_notes(raw: dict[str, str | None]) -> list[str]:
    """One sentence per scope setting of the link that the sidebar could not take: a policy that has no
    meaning under the scope shown, or an allocation that is not one."""
    s, out = st.session_state, []
    want = raw.get("policy")
    if want in ALL_POLICIES and want != s.get("policy"):
        other = next(sc for sc in SCOPES if want in SCOPE_POLICIES[sc])
        out.append(f"Policy {want} runs under scope {other} only; under scope {s.get('scope')} this view shows "
                   f"policy {s.get('policy')}.")
    alloc = raw.get("allocation")
    if alloc is not None and s.get("policy") in INPUT_CALIBRATED and alloc != s.get("allocation"):
        out.append(f"The link's allocation '{escape_markdown(alloc[:40])}' is not one of uniform or greedy; "
                   f"showing allocation {s.get('allocation')}.")
    return out


def resolve_context() -> Context | None:
    """Saved run or live analysis of the sidebar's spec; None after showing an error. A saved run
    opened in this session (?run=<id>) stays the view on every page, also when a menu link drops
    `run` from the URL (it is put back), until a setting differs from the saved one."""
    in_url = st.query_params.get("run")
    run_id = in_url or st.session_state.get("_opened_run")
    saved = _saved_run(run_id) if run_id else None
    try:
        if saved is not None and (in_url is None or st.session_state.get("_opened_run") != run_id):
            _apply_saved_spec(saved.spec)          # opened here, or a menu link that kept no settings
            st.session_state["_opened_run"] = run_id
        spec = sidebar()
        if saved is not None and spec == saved.spec:
            if st.query_params.get("run") != run_id:
                st.query_params["run"] = run_id
            return Context(spec=spec, analysis=saved, run_id=run_id)
        if saved is not None:
            _leave_saved_run()                    # settings changed: this is no longer the saved run
        return Context(spec=spec, analysis=cached_analysis(spec))
    except InputError as exc:
        st.error(escape_markdown(str(exc)))
        if isinstance(exc, TooManyTokens):
            st.button(f"Analyse the first {exc.limit} tokens", type="primary", on_click=_truncate_prompt,
                      args=(exc.limit,))
        if isinstance(exc, KernelCannotCompute):
            st.button("Use the reference kernel", type="primary", on_click=_use_reference_kernel,
                      help="Plain torch: computes every neuron of any activation and masks the unselected ones.")
        return None


def _saved_run(run_id: str) -> Analysis | None:
    """The saved run, or None after saying why it cannot be shown (and leaving it)."""
    try:
        saved = run_store().load(run_id)
        why = f"There is no saved run with id '{run_id[:40]}'"
    except InputError as exc:
        saved, why = None, f"Saved run '{run_id[:40]}' cannot be opened ({exc})"
    if saved is None:
        st.error(f"{escape_markdown(why)}; showing a live analysis instead.")
        _leave_saved_run()
    return saved


def _use_reference_kernel() -> None:
    st.session_state["kernel"] = "reference"


def _truncate_prompt(limit: int) -> None:
    s = st.session_state
    s["prompt"] = truncate_to_tokens(cached_model(s["model"] or DEFAULT_MODEL), s["prompt"], limit)


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
        params = {"model": s.model, "prompt": s.prompt, "scope": s.scope, "policy": s.policy,
                  "density": f"{s.density:g}", "kernel": s.kernel,
                  **({"allocation": s.allocation} if s.policy in INPUT_CALIBRATED else {})}
    params.update({k: v for k in PAGE_KEYS if (v := page_selection(k)) is not None})
    return f"{base}/{page}?{urlencode(params)}"


def page_selection(key: str):
    """A page selection (layer, token...): its widget's value, or on a page that does not draw the
    widget and was opened by a link, the link's."""
    value = st.session_state.get(key)
    return st.query_params.get(key) if value is None else value


def shown_layer(analysis: Analysis) -> int:
    """The layer of the view, within the analysis' layers (0 for what is not a layer number)."""
    value = str(page_selection("layer") or 0)
    return min(int(value), analysis.n_layers - 1) if value.isdigit() else 0


def work_button(label: str, note: str | None = None, **kwargs) -> bool:
    """A button (with a note above it) that starts one-off work in this run: True on the click, and then
    gone, so that it is not there when the work is done."""
    slot = st.empty()
    with slot.container():
        if note:
            st.info(note)
        clicked = st.button(label, **kwargs)
    if clicked:
        slot.empty()
    return clicked


def explain(markdown: str) -> None:
    with st.expander("What am I looking at?"):
        st.markdown(markdown)


def show(plot, key: str | None = None) -> None:
    """A sam_viz.figures.firing.Plot: the figure, and what was reduced to fit the browser, if anything. The
    modebar shows on hover only, in the band the figures keep free above their titles. A figure with
    no data (it says why in its middle) is only that sentence, once."""
    if not plot.fig.data and plot.note:
        st.info(escape_markdown(plot.note), icon=":material/info:")
        return
    st.plotly_chart(plot.fig, width="stretch", key=key, config={"displayModeBar": "hover", "displaylogo": False})
    if plot.note:
        st.caption(plot.note)


def cost_delta(sparse: float, dense: float, dense_text: str, what: str = "", timed: int | None = None) -> dict:
    """st.metric keywords for a cost (bytes, FLOPs, time) against dense: the signed change, so that a
    decrease points down in green and an increase up in red; no arrow when it rounds to no change.
    `what` names the quantity in the delta ("-25% bytes vs dense"), so that a count is not read as a
    time. `timed`: how this run's measured time moved (sam_viz.speed.time_change: +1 slower, -1 faster,
    0 the same; None when not timed): a counted cost keeps its colour only where the measured time
    moved the same way, so that a run measured slower than dense shows no green arrow (a grey one)."""
    change = sparse / dense - 1 if dense else 0.0
    named = f" {what}" if what else ""
    if round(change, 2) == 0:
        return dict(delta=f"same{named} as dense ({dense_text})", delta_color="off", delta_arrow="off")
    agrees = timed is None or timed == (1 if change > 0 else -1)
    return dict(delta=f"{change:+.0%}{named} vs dense ({dense_text})", delta_color="inverse" if agrees else "off")


def layer_picker(analysis: Analysis) -> int:
    return st.number_input("Layer", 0, analysis.n_layers - 1, 0, key="layer", bind="query-params")


def token_picker(analysis: Analysis) -> int:
    """The token box over this analysis' tokens. A link gives the token's index, the box reads and writes
    its label: the index is put in the URL as the label, for the rerun to open."""
    s, labels = st.session_state, [f"{i}: {t}" for i, t in enumerate(analysis.tokens)]
    link = st.query_params.get("token")
    if link is not None and link.isdigit():
        index = _token_in_range(int(link), len(labels))
        try:
            del st.query_params["token"]
            if index:
                st.query_params["token"] = labels[index]
                st.rerun()
        except StreamlitAPIException:          # bound: this page drew the box already
            s["token"] = index
    return st.selectbox("Token", range(len(labels)), format_func=lambda i: labels[i], key="token",
                        bind="query-params")


def _token_in_range(index: int, n: int) -> int:
    if index < n:
        return index
    st.warning(f"The link's token {index} is out of range: this prompt has {n} tokens (0 to {n - 1}); "
               "showing token 0.")
    return 0
