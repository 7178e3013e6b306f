"""Overview: one prompt through the sparse model; per-layer density and mass kept."""
import pandas as pd
import streamlit as st

from sam_viz import DEFAULT_MODEL, InputError, RunSpec, analyze, load_model


@st.cache_resource(show_spinner=False)
def cached_model(spec: str):
    return load_model(spec)


st.title("sam-viz")
prompt = st.text_area("Prompt", "The quick brown fox jumps over the lazy dog.")
policy = st.selectbox("Policy", ["topk", "threshold", "dense"])
density = st.slider("Density", 0.05, 1.0, 0.5, 0.05)

try:
    spec = RunSpec(prompt=prompt, model=DEFAULT_MODEL, policy=policy, density=density)
    with st.spinner(f"Loading {spec.model} and running the prompt..."):
        result = analyze(cached_model(spec.model), spec)
except InputError as exc:
    st.error(str(exc))
    st.stop()

st.metric("Density computed", f"{result.density:.3f}")
st.dataframe(pd.DataFrame(result.to_json()["layers"]), hide_index=True)
st.json(result.compare)
