"""Runs and sharing: links that reproduce a view, saved runs, and exports."""
import pandas as pd
import streamlit as st

from pages._shared import page_context, explain, run_store, share_url, shown_layer
from sam_viz import InputError, export
from sam_viz.report import report_plots
from sam_viz.text import escape_markdown

ctx = page_context()
a = ctx.analysis
st.header("Runs and sharing")
explain("""
- **Link to this view**: the URL holds every setting (model, prompt, policy, density, layer...), so
  whoever opens it sees the same analysis, computed again on their side.
- **Save run**: stores this analysis on the server under a short id; `?run=<id>` reopens it exactly,
  without running the model again, also after the server restarts.
- **Export**: one HTML file whose charts work offline, or the numbers as CSV / JSON.
""")

st.subheader("Link to this view")
st.code(share_url(ctx), language=None, wrap_lines=True)

st.subheader("Save this run")
problem = None                                  # the store's one sentence, said once on this page
if ctx.run_id:
    st.caption(f"This is saved run `{ctx.run_id}`: the link above opens it.")
elif st.button("Save run", type="primary", help="Saving the same analysis again gives the same id."):
    try:
        run_id = run_store().save(a)
        st.success(f"Saved as `{run_id}`. Share this link:")
        st.code(share_url(ctx, run_id=run_id), language=None, wrap_lines=True)
    except InputError as exc:
        problem = str(exc)
        st.error(escape_markdown(problem))

st.subheader("Saved runs")
try:
    runs = run_store().list(limit=50)
except InputError as exc:                       # a read-only, full or damaged store
    runs = None
    if str(exc) != problem:
        st.error(escape_markdown(str(exc)))
if runs:
    df = pd.DataFrame(runs)
    df["open"] = [share_url(ctx, run_id=run_id) for run_id in df["id"]]
    st.dataframe(df, hide_index=True, column_config={"open": st.column_config.LinkColumn("open")})
elif runs is not None:
    st.caption("No saved runs yet.")

st.subheader("Export")
stem = f"sam-viz-{a.spec.model.replace('/', '_')}-{a.spec.policy}-{a.spec.density:g}"
c1, c2, c3 = st.columns(3)
layer = shown_layer(a)
c1.download_button("HTML report", lambda: export.to_html(a, report_plots(a, layer)), f"{stem}.html", "text/html",
                   on_click="ignore")
c2.download_button("CSV", lambda: export.to_csv(a), f"{stem}.csv", "text/csv", on_click="ignore")
c3.download_button("JSON", lambda: export.to_json(a), f"{stem}.json", "application/json", on_click="ignore")
