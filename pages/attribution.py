"""Attribution: which input tokens drive the output, in the dense and the sparse model, and which
MLP neurons carry it (captum)."""
import pandas as pd
import streamlit as st

from pages._shared import explain, page_context, show
from sam_viz import InputError
from sam_viz.attribution import MAX_STEPS, attribute, likely_targets
from sam_viz.routing_plots import neuron_attribution_plot
from sam_viz.text import colored_tokens

ctx = page_context()
st.header("Attribution")
explain("""
**Which tokens of the prompt drive the output?** For a language model the output is the score
(logit) of one next token you pick; for a sentence encoder it is how close the embedding stays to
the dense model's embedding. Integrated gradients walks from a neutral input (every word replaced by
an unknown-word token) to your prompt and adds up how much each token's embedding moved the
output; the **delta** is how far that sum is from the real change of the output (0 = exact).
Input x gradient is a faster, rougher estimate.

**Under sparsity**: the sparse model keeps, along the whole path, the neurons it chose on your
prompt (its selection is *frozen*), so what is explained is exactly the sparse model that ran. If
the selection were recomputed at every step, the output would jump where the chosen set changes
and the gradients would not see those jumps. (Mixture-of-experts layers keep routing at every step.)

**Neurons**: the same question one level down: which MLP neurons of a layer carry the output.
**Attribution mass lost** is the share of the dense model's neuron attribution that sits on
neurons the sparse model dropped; 0 means the sparse model kept everything that mattered.
""")
if ctx.run_id:
    st.info("Attribution needs the model; open this run's settings as a live analysis to compute it.")
    st.stop()

loaded = ctx.model()
c1, c2, c3 = st.columns([2, 1, 1])
with c1:
    if loaded.kind == "causal-lm":
        choices = likely_targets(loaded, ctx.spec)
        pick = st.selectbox("Next token to explain", range(len(choices)),
                            format_func=lambda i: f"{choices[i]['token']}  ({choices[i]['prob']:.1%})")
        target_id = choices[pick]["id"]
    else:
        st.markdown("Target: **embedding cosine to the dense model's embedding**")
        target_id = None
with c2:
    method = st.radio("Method", ["ig", "ixg"], horizontal=True,
                      format_func=lambda m: {"ig": "integrated gradients", "ixg": "input x gradient"}[m])
with c3:
    steps = st.number_input("Steps", 2, MAX_STEPS, 50, disabled=method != "ig")

bar = st.progress(0.0, text="Attributing...")
try:
    a = attribute(loaded, ctx.spec, method=method, steps=int(steps), target_id=target_id,
                  progress=lambda f, t: bar.progress(f, text=t))
except InputError as exc:
    st.error(str(exc))
    st.stop()
bar.empty()

m1, m2, m3 = st.columns(3)
if a.delta_dense is not None:
    m1.metric("delta, dense", f"{a.delta_dense:.2e}", help="sum of attributions - (f(input) - f(baseline))")
    m2.metric("delta, sparse", f"{a.delta_sparse:.2e}")
m3.metric("time", f"{a.timings_ms['total'] / 1000:.2f} s")


diff = [s - d for d, s in zip(a.dense, a.sparse)]
st.caption("Red pushes the output up, blue pulls it down; stronger colour = larger share.")
for label, values in (("Dense", a.dense), ("Sparse", a.sparse), ("Sparse - dense", diff)):
    st.markdown(f"**{label}**<br>{colored_tokens(a.tokens, values)}", unsafe_allow_html=True)

if a.mass_lost:
    st.subheader("Neurons")
    layer = st.number_input("Layer", 0, len(a.mass_lost) - 1, 0, key="layer", bind="query-params")
    c1, c2 = st.columns([2, 1])
    with c1:
        show(neuron_attribution_plot(a, layer), key="neuron_attr")
    with c2:
        st.dataframe(pd.DataFrame({"layer": range(len(a.mass_lost)), "attribution mass lost": a.mass_lost}),
                     hide_index=True)
else:
    st.info("Neuron attribution is not available for mixture-of-experts models yet.")
