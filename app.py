"""sam-viz: Streamlit entry. Thin: page config and navigation over pages/; each page draws the
shared sidebar (pages/_shared.py) and reads its analysis from the library."""
from pages._shared import navigation

navigation().run()
