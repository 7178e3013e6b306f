"""Routing: how well each policy picks the neurons that matter, which neurons are hot or cold,
which fire together, and for MoE models what the router does."""
from dataclasses import replace

import streamlit as st

from pages._shared import cached_analysis, explain, layer_picker, page_context, show, work_button
from sam_viz import calibration_counts, firing_counts
from sam_viz.figures import firing, routing
from sam_viz.text import escape_markdown
from sam_viz.sparse_ops import get_calibration

ctx = page_context()
a = ctx.analysis
st.header("Routing")
explain("""
A sparse model has to **choose** its neurons for each token. The best possible choice, the
**oracle**, keeps the k neurons with the largest |h|, but it must compute every neuron to know
them. Real policies choose more cheaply:

- **threshold** (CATS, TEAL): keep the neurons whose gate activation is above a calibrated value;
- **predictor** (Deja Vu): a small network reads the token's input and guesses the oracle set
  *before* any MLP weight is read; its own cost is counted in the weights read;
- **static**: the same neurons for every token, the ones most often in the oracle set on
  calibration text. This is plain pruning, the baseline dynamic sparsity must beat.

**Recall** is the share of the oracle's neurons a policy picked (1 = perfect). **Hot** neurons fire
for almost every token; **cold** ones almost never. **Co-firing** shows which of the hottest
neurons tend to fire for the same tokens.
""")

layer = layer_picker(a)
st.subheader(f"Policies side by side at density {a.spec.density:g}")
if ctx.run_id:
    st.info("This is a saved run: only its own policy is shown. Comparing policies runs the model: choose "
            "**Analyse live** above.")
    show(routing.recall_by_policy({a.spec.policy: a}), key="recall")
else:
    trained = get_calibration(ctx.model(), train=False) is not None
    if not trained and not work_button(f"Train the predictor and static sets for {escape_markdown(ctx.spec.model)}",
                                       help="Once per model; stored on disk and reused."):
        st.caption("The predictor and static policies need a one-time calibration on the built-in text.")
        policies = ["topk", "threshold"]
    else:
        policies = ["topk", "threshold", "predictor", "static"]
    analyses = {p: cached_analysis(replace(ctx.spec, policy=p)) for p in policies}
    c1, c2 = st.columns(2)
    with c1:
        show(routing.recall_by_policy(analyses), key="recall")
    with c2:
        show(routing.policy_summary(analyses), key="policy_summary")

st.subheader("Hot and cold neurons")
source = st.radio("Firing frequency over", ["this prompt", "calibration text"], horizontal=True, key="freq",
                  bind="query-params")
calibrated = None if ctx.run_id or source == "this prompt" else calibration_counts(ctx.model(), layer, a.spec.density)
c1, c2 = st.columns(2)
with c1:
    if calibrated is not None:
        counts, n = calibrated
        show(routing.firing_frequency(counts, n, layer, "in the oracle top-k on calibration text"),
             key="frequency")
    else:
        if source == "calibration text":
            st.caption("A saved run is shown without the model, so its firing over the calibration text is not "
                       "known; showing this prompt." if ctx.run_id else
                       "No calibration is stored for this model yet; showing this prompt.")
        show(routing.firing_frequency(firing_counts(a, layer), len(a.tokens), layer,
                                            f"selected by the {a.spec.policy} policy on this prompt"), key="frequency")
with c2:
    show(routing.cofiring(a, layer), key="cofiring")

if a.n_experts:
    st.subheader("Experts")
    if a.n_shared:
        st.caption("This model has **shared experts**: every token goes through them beside the experts the "
                   "router picks. Their neurons are MLP neurons like any other: the policy sparsifies them, and "
                   "density counts them (neuron ids after the routed experts'). They show as the column "
                   "**shared**.")
    show(firing.expert_heatmap(a, layer), key="experts")
    c1, c2 = st.columns(2)
    with c1:
        show(routing.router_entropy(a), key="entropy")
    with c2:
        show(routing.expert_load(a), key="load")
