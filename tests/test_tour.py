"""The classroom tour (pages/tour.py) as a teacher walks it, and the way to it from the default model:
every step by Next and Back and by link (?step=N), junk step values, "Open this in the app", and
the sidebar hint on minilm. Runs on the shipped demo LMs; nothing here depends on what their
weights write."""
import html
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import shared
from pages._shared import DOC_PRESETS, PRESETS
from test_app import open_app

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
N_STEPS = 8
DOC_PROMPT = "The :func:`open` function returns a file object, which"
# the figures each step shows before any click (step 7: topk's recall until static is calibrated)
CHARTS = {1: ["every neuron computed"],
          2: ["which neurons the sparse model computed", ", token "],
          3: ["Density and mass kept per layer", "kept vs density"],
          4: ["Next token at the last position"],
          5: [],
          6: ["Next token at the last position"] * 2,
          7: ["Recall of the oracle top-k per layer"],
          8: []}


@pytest.fixture(autouse=True)
def run_db(tmp_path, monkeypatch):
    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "runs.sqlite"))


def open_tour(**params) -> AppTest:
    return open_app("tour", timeout=300, **params)


def titles(at) -> list[str]:
    import json

    return [json.loads(el.proto.spec)["layout"]["title"]["text"] for el in at.get("plotly_chart")]


def shown_step(at) -> int:
    """The step the page says it shows ("Step 4 of 8")."""
    line = next(m.value for m in at.markdown if m.value.startswith("**Step "))
    n, of = line.removeprefix("**Step ").split("**")[0].split(" of ")
    assert int(of) == N_STEPS
    return int(n)


def check_step(at, n: int) -> None:
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert shown_step(at) == n
    shown, want = titles(at), list(CHARTS[n])
    if n == 7 and not any(b.label == "Prepare the static policy" for b in at.button):
        want.append("Next token at the last position")    # static calibrated (by an earlier test): its list too
    assert len(shown) == len(want) and all(any(w in t for t in shown) for w in want), shown
    assert at.session_state["model"] == "minilm"          # the tour never changed the user's sidebar


def test_walk_the_whole_tour_forward_and_back():
    at = open_tour()
    check_step(at, 1)
    assert at.button(key="tour_back").disabled
    for n in range(2, N_STEPS + 1):
        at.button(key="tour_next").click().run()
        check_step(at, n)
        assert at.query_params["step"] == str(n)
    assert at.button(key="tour_next").disabled
    for n in range(N_STEPS - 1, 0, -1):
        at.button(key="tour_back").click().run()
        check_step(at, n)


def test_every_step_opens_from_its_link():
    for n in range(1, N_STEPS + 1):
        check_step(open_tour(step=str(n)), n)


def test_step_five_writes_both_continuations_and_follows_the_slider():
    at = open_tour(step="5")
    text = html.unescape(" ".join(m.value for m in at.markdown))      # the prompt's signs come as entities
    prompt = f'<span style="color: grey">{DOC_PROMPT}</span>'
    assert "**All neurons:** " + prompt in text and "**10% of the neurons:** " + prompt in text
    at.select_slider(key="tour_density").set_value(0.05).run()
    assert not at.exception and "**5% of the neurons:**" in " ".join(m.value for m in at.markdown)
    at = open_tour(step="5", tour_density="0.25")                      # the slider's value in a link
    assert not at.exception and "**25% of the neurons:**" in " ".join(m.value for m in at.markdown)


@pytest.mark.parametrize("raw,step", [("0", 1), ("-3", 1), ("99", N_STEPS), ("abc", 1), ("", 1), ("4.5", 4),
                                      ("1e9", N_STEPS), ("nan", 1), (" 3 ", 3), ("x" * 5000, 1)])
def test_junk_and_out_of_range_steps_clamp(raw, step):
    at = open_tour(step=raw)
    check_step(at, step)
    if raw:
        assert at.query_params["step"] == str(step)       # the URL now says which step is shown


def test_hostile_tour_params_fall_back_to_defaults():
    at = open_tour(step="2", tour_layer="999", tour_token="-5", tour_density="abc")
    check_step(at, 2)
    last = len(shared("demo-lm").encode(DOC_PROMPT)["input_ids"][0]) - 1      # the prompt's last token
    assert at.number_input(key="tour_layer").value == 2 and at.selectbox(key="tour_token").value == last
    at = open_tour(step="4", tour_density="7")
    check_step(at, 4)
    assert at.select_slider(key="tour_density").value == 0.1


def test_token_picker_shows_text_not_byte_level_pieces():
    at = open_tour(step="2")
    labels = at.selectbox(key="tour_token").options
    assert labels[0] == "0: <|endoftext|>" and any(label.endswith(": ·function") for label in labels)
    assert not any(c in label for label in labels for c in "ĠĊ")


def test_open_this_in_the_app_applies_the_step_and_switches_page():
    at = AppTest.from_file(APP, default_timeout=300)
    at.query_params["model"] = "tiny-llama"
    at.run()
    at.switch_page("pages/tour.py")
    at.query_params["step"] = "3"
    at.run()
    assert not at.exception and shown_step(at) == 3
    at.button(key="tour_open").click().run()
    assert not at.exception and not at.error
    spec = at.session_state["ctx"].spec
    assert (spec.model, spec.prompt, spec.policy, spec.density) == ("demo-lm", DOC_PROMPT, "topk", 0.1)
    assert any("Density and mass kept per layer" in t for t in titles(at))          # the Density page


def test_where_to_go_next_opens_a_page_with_the_tour_settings():
    at = AppTest.from_file(APP, default_timeout=300).run()
    at.switch_page("pages/tour.py")
    at.query_params["step"] = str(N_STEPS)
    at.run()
    next(b for b in at.button if b.label == "Firing map").click().run()
    assert not at.exception and not at.error
    spec = at.session_state["ctx"].spec
    assert (spec.model, spec.prompt, spec.policy, spec.density) == ("demo-lm", DOC_PROMPT, "topk", 0.1)
    assert any("which neurons the sparse model computed" in t for t in titles(at))


def test_minilm_hint_switches_to_demo_lm_and_a_doc_prompt():
    at = AppTest.from_file(str(ROOT / "pages" / "firing.py"), default_timeout=300).run()
    assert not at.exception and at.session_state["ctx"].spec.model == "minilm"
    assert any("Want a model that writes text?" in i.value for i in at.info)
    next(b for b in at.button if b.label == "Try demo-lm").click().run()
    assert not at.exception and not at.error
    spec = at.session_state["ctx"].spec
    assert spec.model == "demo-lm" and spec.prompt == DOC_PROMPT
    assert not any("Want a model that writes text?" in i.value for i in at.info)


def test_doc_presets_join_the_existing_ones():
    assert set(DOC_PRESETS.values()) <= set(PRESETS.values()) and DOC_PROMPT in DOC_PRESETS.values()
    assert PRESETS["Fox"] == "The quick brown fox jumps over the lazy dog."
