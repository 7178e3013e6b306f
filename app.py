"""sam-viz: Streamlit entry. Thin: page config, navigation over pages/, the shared sidebar."""
import streamlit as st

st.set_page_config(page_title="sam-viz", layout="wide")

page = st.navigation([st.Page("pages/overview.py", title="Overview", default=True)])
page.run()
