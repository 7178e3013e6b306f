"""The app runs: AppTest of the entry script and its page (Streamlit's own testing harness)."""
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent


def test_overview_page_runs_on_minilm():
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 6
    at.text_area[0].set_value("").run()
    assert not at.exception and "prompt is empty" in at.error[0].value
