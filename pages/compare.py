"""Dense vs sparse: where and how much the sparse model's computation departs from the dense one."""
import streamlit as st

from pages._shared import cost_delta, explain, page_context, show
from sam_viz import greedy_continuation
from sam_viz.figures import quality
from sam_viz.analysis import describe_compare
from sam_viz.cost import cost_sentence
from sam_viz.text import continuation_html

ctx = page_context()
a = ctx.analysis
st.header("Dense vs sparse")
explain("""
- **Divergence per layer**: after each layer, how far the sparse model's hidden state is from the
  dense model's, relative to its size. Errors made early are carried (and often grow) later.
- **Next-token distributions** (language models): the ten most likely next tokens for each model.
  **Embedding cosine per sentence** (sentence encoders): 1.0 means the sparse model's sentence
  embedding points exactly where the dense one does.
- **Greedy continuation** (language models): both models write N more tokens, always picking the
  most likely one. The first token where they part ways is highlighted.
""")
m1, m2, m3 = st.columns(3)
for col, (name, value, meaning) in zip((m1, m2, m3), describe_compare(a.compare)):
    col.metric(name, value, help=meaning or None)
if a.cost:
    c = a.cost
    k1, k2, k3 = st.columns(3)
    k1.metric("MLP weights read per token", f"{c['sparse_bytes'] / 1e6:.2f} MB",
              **cost_delta(c["sparse_bytes"], c["dense_bytes"], f"{c['dense_bytes'] / 1e6:.2f} MB", "bytes"))
    k2.metric("MLP FLOPs per token", f"{c['sparse_flops'] / 1e6:.2f} M",
              **cost_delta(c["sparse_flops"], c["dense_flops"], f"{c['dense_flops'] / 1e6:.2f} M", "FLOPs"))
    if a.spec.policy == "predictor":
        k3.metric("of which the predictor", f"{c['predictor_bytes'] / 1e6:.2f} MB",
                  f"{c['predictor_flops'] / 1e6:.2f} M FLOPs", delta_color="off", delta_arrow="off")
    st.caption(cost_sentence(a.kind, a.spec.policy))

c1, c2 = st.columns(2)
with c1:
    show(quality.divergence_plot(a), key="divergence")
with c2:
    show(quality.next_token_plot(a), key="next_tokens")

if a.kind == "causal-lm":
    st.subheader("Greedy continuation")
    if ctx.run_id and not a.continuation:
        st.info("This saved run has no continuation. Writing one runs the model: choose **Analyse live** above.")
    if ctx.run_id is None:
        n_new = st.number_input("Tokens to generate", 1, 64, 16)
        if st.button("Continue with both models"):
            with st.spinner(f"Generating {n_new} tokens twice..."):
                a.continuation = greedy_continuation(ctx.model(), ctx.spec, int(n_new))
    if a.continuation:
        first = a.continuation["first_divergence"]
        for name in ("dense", "sparse"):
            st.markdown(f"**{name.capitalize()}:** {continuation_html(a.continuation[name], first)}",
                        unsafe_allow_html=True)
        st.caption("The two continuations agree." if first is None else
                   f"They first differ at generated token {first + 1}.")
