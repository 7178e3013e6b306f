"""Whole model: sparsity on every projection's input (scope all), for one layer and projection: which
input channels each token kept, how the density is spread over layers and projections, the massive
activation channels, the mass each projection keeps, and quality against whole-model density."""
import streamlit as st

from pages._shared import cached_model, explain, layer_picker, page_context, progress_bar, show
from sam_viz import InputError
from sam_viz import whole_model as wm
from sam_viz.figures import whole_model as figs
from sam_viz.text import escape_markdown


def _to_scope_all() -> None:
    st.session_state["scope"], st.session_state["policy"] = "all", "topk"


@st.cache_resource(show_spinner=False, max_entries=8)
def _inputs(spec, layer: int) -> dict:
    """The layer's projection inputs in this run's sparse pass (one more pass of the prompt), shared."""
    return wm.layer_inputs(cached_model(spec.model), spec, layer)


ctx = page_context()
a, spec = ctx.analysis, ctx.spec
st.header("Whole model")
explain(f"""
Under **scope all** the policy chooses, for every token, which entries of each projection's *input*
are used: y = W[:, S] x_S, so only the columns of W for the kept entries S are read. The projections of
a block are q, k and v (one input; fused as qkv in some families), o (the attention output), gate and
up (the MLP's input) and down (its input is h, the neurons). Embeddings and the unembedding stay dense.

- **Whole-model density**: the share of the blocks' matrix weights read per token (each projection's
  weight count times its input density); embeddings and the unembedding are not counted.
- **Kept map**: tokens x input channels of the chosen projection; warm = kept, blue-grey = dropped,
  darker = larger |x|.
- **Allocation**: each projection's input density per layer. `uniform` puts every projection at the
  target; `greedy` (TEAL) lowers first the projections whose sparsity adds the least error to the
  block's output, weighted by their weight counts; the block output error is the layer's relative
  squared error on the calibration text.
- **Massive activations**: a channel is *massive* when its largest |x| over the prompt's tokens is at
  least {wm.MASSIVE_RATIO:g} times the median channel's (Sun et al. 2024); the chart lists the
  {wm.TOP_CHANNELS} channels of largest ratio, marks the massive ones with *, and shows for each policy,
  applied to the same input, the share of tokens that keep it.
- **Mass kept**: the share of sum |x_i| (wina: of sum |x_i| x ||W[:, i]||) the kept entries carry.
- **Sweep**: quality against whole-model density for topk, teal (uniform, greedy) and wina (greedy), and
  the MLP-only policies at the whole-model work they do, attention dense.
""")

if spec.scope != "all":
    st.info(f"This run's scope is mlp: the policy chooses MLP neurons only and every attention projection reads "
            f"its whole input{'' if a.model_density is None else f' (whole-model density {a.model_density:.1%}, embeddings excluded)'}. "
            "This page shows scope all, where every projection's input is sparse.", icon=":material/info:")
    st.button("Switch to scope all (topk)", type="primary", on_click=_to_scope_all)
    st.stop()

c1, c2, c3 = st.columns(3)
c1.metric("Whole-model density", "n/a" if a.model_density is None else f"{a.model_density:.1%}",
          help="Share of the blocks' matrix weights read per token; embeddings and the unembedding excluded.")
c2.metric("MLP neuron density", f"{a.density:.1%}", help="Share of the MLP's neurons whose down column was read "
          "(embeddings excluded).")
quality = "kl" if "kl" in a.compare else "cosine"
c3.metric("KL(dense || sparse)" if quality == "kl" else "Embedding cosine vs dense", f"{a.compare[quality]:.3g}")

layer = layer_picker(a)
masks = wm.recorded_masks(a, layer)
loaded = None
inputs = {}
if ctx.run_id is None:
    loaded = ctx.model()
    try:
        with st.spinner("Recording this layer's projection inputs..."):
            inputs = _inputs(spec, layer)
    except InputError as exc:
        st.error(escape_markdown(str(exc)))
        st.stop()
names = [n for n in (a.projections[layer] if a.projections and layer < len(a.projections) else {})
         if n in inputs and n in masks]
st.subheader("Kept map")
if not names:
    st.info("This view has no recorded inputs for this layer (a saved run keeps none; a mixture-of-experts "
            "layer's experts and a prompt over the mask budget keep counts only); the allocation below still shows.")
    name = None
else:
    name = st.selectbox("Projection", names, key="projection", bind="query-params")
    show(figs.kept_map(inputs[name], masks[name], a.tokens, layer, name,
                       f"{spec.policy} at whole-model density {spec.density:g}"), key="kept_map")

st.subheader("Allocation")
cal = wm.input_calibration(loaded) if loaded is not None else None
if spec.policy in ("teal", "wina") and cal is not None:
    show(figs.allocation_heatmap(wm.allocation_grids(cal, spec.density, spec.policy), spec.density, spec.policy),
         key="allocation_map")
    st.caption(f"Calibrated on {escape_markdown(cal.source)}.")
else:
    show(figs.allocation_heatmap(wm.measured_grid(a), spec.density, spec.policy), key="allocation_map")

if name is not None:
    left, right = st.columns(2)
    x = inputs[name]
    colnorm = wm.column_norm(loaded, layer, name)
    with left:
        channels = wm.massive_channels(x)
        rates = wm.keep_rates(wm.policy_masks(x, spec.density, layer, name, spec.allocation, cal, colnorm),
                              [c["channel"] for c in channels])
        show(figs.massive_plot(channels, rates, wm.MASSIVE_RATIO, layer, name), key="massive")
        if cal is None:
            st.caption("teal and wina need this model's input calibration; run teal or wina once to make it.")
    with right:
        rows = [{"projection": n, "density": float(masks[n].float().mean()),
                 "mass_kept": wm.mass_kept(inputs[n], masks[n],
                                           wm.column_norm(loaded, layer, n) if spec.policy == "wina" else None)}
                for n in names]
        show(figs.mass_kept_plot(rows, layer, spec.policy), key="mass_kept")

st.subheader("Quality vs whole-model density")
sweeps = st.session_state.setdefault("_whole_model_sweeps", {})
if spec not in sweeps and loaded is not None:
    n = len(wm.SWEEP_SERIES) * len(wm.SWEEP_DENSITIES)
    if st.button("Run the whole-model sweep", help=f"{n} sparse passes of this prompt: "
                 f"{', '.join(s[0] for s in wm.SWEEP_SERIES)} at densities "
                 f"{', '.join(f'{d:g}' for d in wm.SWEEP_DENSITIES)}"):
        try:
            with progress_bar("Whole-model sweep") as step:
                sweeps[spec] = wm.whole_model_sweep(loaded, spec, progress=step)
        except InputError as exc:
            st.error(escape_markdown(str(exc)))
if spec in sweeps:
    rows, skipped = sweeps[spec]
    metric = rows[0]["metric"] if rows else None
    current = (a.model_density, a.compare[metric]) if metric in a.compare and a.model_density is not None else None
    show(figs.quality_sweep(rows, current), key="whole_model_sweep")
    for line in skipped:
        st.caption(escape_markdown(f"Left out: {line}"))
elif loaded is None:
    st.caption("The sweep needs the model: choose \"Analyse live\" above.")
