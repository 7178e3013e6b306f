"""Density: how many neurons each layer computed, how the activations are distributed, and what
quality each density buys."""
import streamlit as st

from pages._shared import explain, page_context, progress_bar, show
from sam_viz import SWEEP_DENSITIES, SWEEP_POLICIES, InputError, density_sweep, mass_curve
from sam_viz.figures import firing, quality
from sam_viz.text import escape_markdown
from sam_viz.sparse_ops import get_calibration

ctx = page_context()
a = ctx.analysis
st.header("Density")
explain("""
- **Target vs achieved**: the density you asked for and the share of neurons each layer really
  computed, with the share of activation mass (sum of |h|) the selected neurons kept.
- **Distribution of |h|**: most neurons are close to zero for most tokens; that is what makes
  sparsity possible. A long tail of large values carries most of the signal.
- **Mass kept vs density**: if every token kept only its top-k neurons, how much of its total |h|
  would survive? A curve far above the diagonal means activations are concentrated in few neurons.
- **Density sweep**: run the sparse model at many densities and measure how far its output moves
  from the dense model's (KL divergence for next-token models, lower is better; embedding cosine
  for sentence encoders, higher is better).
""")

c1, c2 = st.columns(2)
with c1:
    show(quality.density_per_layer(a), key="density_per_layer")
with c2:
    if a.has_activations:
        show(quality.activation_histogram(a), key="activation_histogram")
    else:
        st.info("This run is too large to keep every activation, so the distribution is not shown.")
if a.has_activations:
    show(quality.mass_curve_plot(mass_curve(a, SWEEP_DENSITIES), SWEEP_DENSITIES), key="mass_curve")

st.subheader("Density sweep")
if a.sweep is None and ctx.run_id is None:
    loaded = ctx.model()
    calibrated = get_calibration(loaded, train=False) is not None     # predictor and static need it
    policies = SWEEP_POLICIES + (("predictor", "static") if calibrated else ())
    if st.button("Run the sweep", help=f"{len(policies) * len(SWEEP_DENSITIES)} sparse passes of this prompt "
                 f"({', '.join(policies)})"):
        try:
            with progress_bar("Density sweep") as step:
                a.sweep = density_sweep(loaded, ctx.spec, policies=policies, progress=step)
        except InputError as exc:
            st.error(escape_markdown(str(exc)))
if a.sweep:
    show(quality.sweep_plot(a.sweep, current=firing.target_density(a)), key="sweep")
elif ctx.run_id:
    st.info("This saved run has no sweep. A sweep runs the model: choose **Analyse live** above to run one.")
