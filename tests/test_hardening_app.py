"""Search for bad links (issue 15): per page, hypothesis draws the query params that the page reads
(the shared sidebar's model, prompt, policy, density, kernel and run; the pages' layer, token,
order, freq, query; the tour's step and its own keys) with hostile values, and opens the page in
AppTest. Every link must give a page without an exception that shows its figures or says what is
wrong in one st.error / st.warning.

The budget is small here (CI); `python -m bench.hardening` runs it with a larger one.
"""
from collections import Counter

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from streamlit.testing.v1 import AppTest

from conftest import TINY
from test_app import ROOT, run_db  # noqa: F401 - the fixture: a fresh run store per test
from test_hardening_cli import BAD_MODELS, EXAMPLES, HOSTILE, INVISIBLE, PROPS, report
from test_profile_view import PID, write_profile

TRIED: Counter = Counter()
PAGES = ("firing", "tour", "density", "compare", "routing", "attribution", "speed", "claims", "runs", "corpus")
TEXT = (st.sampled_from([h for h in HOSTILE if len(h) < 1000] + ["x" * 100_000]) | st.text(max_size=30)
        | st.text(st.sampled_from(INVISIBLE), min_size=1, max_size=6))
NUMBER = st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "0", "1", "3", "0.3", "-5", "999999999999"]) | TEXT
SHARED = {"model": st.sampled_from(["tiny-llama", "tiny-gpt2", "tiny-bert"]) | st.sampled_from(BAD_MODELS) | TEXT,
          "prompt": st.sampled_from(["One two three. Four five.", "\u202e\u200b", "word " * 600]) | TEXT,
          "policy": st.sampled_from(["dense", "topk"]) | TEXT, "density": NUMBER,
          "kernel": st.sampled_from(["reference", "triton"]) | TEXT, "run": TEXT}
PAGE_PARAMS = {"firing": ("layer", "token", "order"), "density": ("layer",), "compare": ("layer", "token"),
               "routing": ("layer", "freq"), "attribution": ("layer", "query"), "speed": (), "runs": (),
               "claims": (), "tour": ("step", "tour_layer", "tour_token", "tour_density"),
               "corpus": ("profile", "layer", "neuron")}
VALUES = {"order": st.sampled_from(["index", "frequency", "clustered"]) | TEXT,
          "freq": st.sampled_from(["this prompt", "calibration text"]) | TEXT,
          "profile": st.sampled_from([PID, PID.upper(), f"../{PID}", "/etc", PID + "0"]) | TEXT}


@pytest.fixture(scope="module", autouse=True)
def counts(request, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:                   # the Corpus page: one hand-built profile
        root = tmp_path_factory.mktemp("profiles")
        write_profile(root)
        mp.setenv("SAM_VIZ_PROFILE_DIR", str(root))
        yield
    report(request, "app", TRIED)


@st.composite
def link(draw, page: str) -> dict[str, str]:
    keys = draw(st.lists(st.sampled_from(sorted(SHARED) + list(PAGE_PARAMS[page])), unique=True))
    params = {k: draw({**SHARED, **VALUES}.get(k, NUMBER)) for k in keys}
    params.setdefault("model", "tiny-llama")                   # minilm, the default, is the slowest model
    return params


def check(page: str, params: dict[str, str]) -> None:
    """No exception; the page's figures, or one sentence saying what is wrong."""
    TRIED[page] += 1
    at = AppTest.from_file(str(ROOT / "pages" / f"{page}.py"), default_timeout=240)
    for key, value in params.items():     # a URL carries UTF-8: a lone surrogate arrives as U+FFFD
        at.query_params[key] = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    at.run()
    assert not at.exception, (params, [e.value for e in at.exception])
    said = [e.value for e in at.error] + [w.value for w in at.warning]
    assert at.get("plotly_chart") or said or page in ("runs", "tour"), params
    if page in ("runs", "tour"):
        assert at.get("plotly_chart") or said or at.get("button") or at.get("dataframe"), params


@pytest.mark.parametrize("page", PAGES)
def test_no_link_breaks_a_page(page):
    @PROPS.__class__(PROPS, max_examples=max(1, EXAMPLES // 8))
    @given(link(page))
    @example({"model": "tiny-llama", "prompt": "\u202e\u200b"})                 # the reported bug, in the app
    def search(params):
        check(page, params)

    search()


def test_a_prompt_of_invisible_characters_is_one_error_in_the_app():
    at = AppTest.from_file(str(ROOT / "pages" / "firing.py"), default_timeout=240)
    at.query_params.update(model="tiny-llama", prompt="\u202e\u200b")
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "the prompt has no tokens for tiny-llama" in at.error[0].value
    at.query_params["prompt"] = "One two three."               # the same session goes on with a good prompt
    at.text_area(key="prompt").set_value("One two three.").run()
    assert not at.exception and not at.error and at.get("plotly_chart")
