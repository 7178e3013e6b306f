"""The classroom tour (pages/tour.py) as a teacher walks it, and the way to it from the default model:
every step by Next and Back and by link (?step=N), junk step values, "Open this in the app", and
the sidebar hint on minilm. Runs on the shipped demo LMs; nothing here depends on what their
weights write. What the steps say is checked against numbers read here on their own: claims.json
through json, the step's tables and figures as shown."""
import html
import json
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from conftest import shared
from pages._shared import DOC_PRESETS, PRESETS
from test_app import open_app

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
N_STEPS = 9
DOC_PROMPT = "The :func:`open` function returns a file object, which"
# the figures each step shows before any click (step 7: topk's recall until static is calibrated)
CHARTS = {1: ["every neuron computed"],
          2: ["which neurons the sparse model computed", ", token "],
          3: ["Density and mass kept per layer", "kept vs density"],
          4: ["Next token at the last position"],
          5: [],
          6: ["Next token at the last position"] * 2,
          7: ["Recall of the oracle top-k per layer"],
          8: ["which input channels each token kept", "spread over layers and projections"],
          9: []}


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



# ------------------------------------------------------------------------------ what the steps say

CLAIMS = json.loads((ROOT / "models" / "demo" / "claims.json").read_text())
COMPARISON = re.compile(r"\*\*([^*]+)\*\*[^*]*?, (higher than|more than|lower than|less than|the same as)\b[^*]*?"
                        r"\*\*([^*]+)\*\*")
UP, DOWN = ("higher than", "more than"), ("lower than", "less than")


def claim(model: str, policy: str, density: float = 1.0) -> dict:
    return next(r for r in CLAIMS["rows"] if r["model"] == model and r["policy"] == policy
                and (policy == "dense" or r["density"] == density))


def texts(at) -> list[str]:
    """What the page says in words: markdown, captions, messages and the help of metrics and pickers."""
    widgets = [*at.metric, *at.selectbox, *at.number_input, *at.select_slider]
    return ([m.value for m in at.markdown] + [c.value for c in at.caption] + [i.value for i in at.info]
            + [w.proto.help for w in widgets if w.proto.help])


def number(shown: str) -> float:
    return float(shown.replace("%", "").replace("−", "-"))


def comparisons(at) -> list[tuple[str, str, str]]:
    """Every sentence with " than " or "the same as", each as (first number, direction, second number);
    a comparative sentence without its two numbers in bold fails here."""
    out = []
    for text in texts(at):
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z*])", html.unescape(text)):
            if " than " in sentence or "the same as" in sentence:
                m = COMPARISON.search(sentence)
                assert m, f"a comparison without its numbers: {sentence}"
                out.append(m.groups())
    return out


@pytest.mark.parametrize("n", range(1, N_STEPS))
def test_every_comparative_sentence_agrees_with_its_numbers(n):
    at = open_tour(step=str(n))
    for a, word, b in comparisons(at):
        x, y = number(a), number(b)
        assert (x > y if word in UP else x < y if word in DOWN else x == y), (a, word, b)


def frame(at, column: str) -> list[dict]:
    """The rows of the step's table that has this column."""
    return next(d.value for d in at.dataframe if column in d.value.columns).to_dict("records")


def test_step_six_rests_on_held_out_perplexity_and_several_prompts():
    """The lesson is the measurements' (claims.json and the prompts' table), not one greedy text: the
    perplexities are claims.json's, each sentence's numbers are the tables', and the verdict names the
    model both measures favour, or says the evidence is mixed."""
    at = open_tour(step="6")
    check_step(at, 6)
    table = {r["model"].split(" ")[0]: r for r in frame(at, "change")}
    for model in ("demo-lm", "demo-lm-dense"):
        assert number(table[model]["all neurons"]) == round(claim(model, "dense")["perplexity"], 2)
        assert number(table[model]["10% of the neurons"]) == round(claim(model, "topk", 0.1)["perplexity"], 2)
    prompts = frame(at, "prompt")
    assert len(prompts) >= 3
    mean = {m: sum(number(r[f"{m}: same first choice"]) for r in prompts) / len(prompts) for m in table}
    shown = {v for r in table.values() for v in r.values()} | {f"{round(v):.0f}%" for v in mean.values()}
    found = comparisons(at)
    assert len(found) >= 3 and all(a in shown and b in shown for a, _, b in found), (found, shown)
    by_ppl = min(table, key=lambda m: number(table[m]["10% of the neurons"]))
    by_choice = max(mean, key=mean.get)
    said = " ".join(texts(at))
    assert (f"Both measures favour {by_ppl}" in said) if by_ppl == by_choice else ("mixed" in said)
    writes = [m.value for m in at.markdown if m.value.startswith(("**demo-lm:**", "**demo-lm-dense:**"))]
    assert len(writes) == 2 * len(prompts)                          # both models' texts for every prompt


def test_step_three_says_what_the_density_costs_as_the_claim_page_does():
    at = open_tour(step="3")
    said = " ".join(texts(at))
    topk = claim("demo-lm", "topk", 0.1)
    assert f"**{topk['mlp_flops'] / topk['dense_mlp_flops']:.0%}** of the dense MLP's FLOPs" in said
    assert "a tenth of the MLP's work" not in said.replace("not a tenth of the work", "")
    bars = next(json.loads(el.proto.spec) for el in at.get("plotly_chart")
                if "Density and mass kept" in json.loads(el.proto.spec)["layout"]["title"]["text"])
    kept = next(t for t in bars["data"] if t["name"].startswith("mass kept"))["y"]
    kept = kept if isinstance(kept, list) else []
    assert f"**{sum(kept) / len(kept):.0%}**" in said if kept else "averaged over the layers" in said


@pytest.mark.parametrize("n", [4, 5])
def test_all_neurons_is_explained_as_demo_lms_weaker_setting(n):
    said = " ".join(texts(open_tour(step=str(n))))
    full, trained = claim("demo-lm", "dense")["perplexity"], claim("demo-lm", "topk", 0.1)["perplexity"]
    assert f"**{full:.2f}**, higher than with 10% **{trained:.2f}**" in said and "never trained in" in said


JARGON = {"Σ|h|": "sum of every neuron's absolute value", "oracle top-k": "found by computing every one",
          "KL": "in plain words", "<|endoftext|>": "marker the model reads before every text"}


@pytest.mark.parametrize("n", range(1, N_STEPS))
def test_jargon_on_a_step_is_explained_on_it(n):
    at = open_tour(step=str(n))
    figures = " ".join(el.proto.spec for el in at.get("plotly_chart"))
    shown = figures + " ".join(texts(at)) + " ".join(o for s in at.selectbox for o in s.options)
    said = " ".join(texts(at))
    for term, meaning in JARGON.items():
        if re.search(rf"(?<![\w]){re.escape(term)}(?![\w])", shown, flags=re.I if term.islower() else 0):
            assert meaning in said, (term, n)


@pytest.mark.parametrize("n", [4, 6])
def test_panels_name_the_neurons_and_share_one_probability_axis(n):
    at = open_tour(step=str(n))
    figs = [json.loads(el.proto.spec)["layout"] for el in at.get("plotly_chart")]
    for layout in figs:
        assert [a["text"] for a in layout["annotations"][:2]] == ["all neurons", "10% of the neurons"]
        assert "model" not in " ".join(a["text"] for a in layout["annotations"][:2])
    ranges = {tuple(layout[axis]["range"]) for layout in figs for axis in ("xaxis", "xaxis2")}
    assert len(ranges) == 1                                          # one probability axis for every panel


def test_step_two_says_why_the_kept_values_differ_after_layer_zero():
    at = open_tour(step="2")
    assert any("different input" in c.value and "layers 0 to 1" in c.value for c in at.caption)
    at.number_input(key="tour_layer").set_value(0).run()
    assert any("In layer 0" in c.value and "equals" in c.value for c in at.caption)


def test_static_calibration_promises_no_time():
    at = open_tour(step="7")
    check_step(at, 7)
    for message in at.info:
        assert not re.search(r"\d+\s*(s|seconds?|min)\b", message.value), message.value


def test_the_sidebar_says_it_is_not_in_use_during_the_tour():
    at = open_tour(step="4")
    notes = [i.value for i in at.sidebar.info]
    assert any("Not in use during the tour" in note for note in notes), notes
    assert not any("Want a model that writes text?" in i.value for i in at.info)


def test_sentences_take_their_direction_from_the_numbers_as_shown():
    from sam_viz import tour_text as tt

    assert tt.compare("a is", "28.81", "b's", "30.58") == "a is **28.81**, lower than b's **30.58**"
    assert tt.compare("a is", "30.58", "b's", "28.81").endswith("higher than b's **28.81**")
    assert "the same as" in tt.compare("a is", tt.pct(0.7302), "b's", tt.pct(0.7349))     # both "73%"
    names = ("demo-lm", "demo-lm-dense")
    assert tt.verdict(("28.81", "30.58"), ("73%", "68%"), names) == "Both measures favour demo-lm."
    assert tt.verdict(("28.81", "30.58"), ("60%", "68%"), names).startswith("The evidence is mixed")
    assert tt.verdict(("31.00", "30.58"), ("60%", "68%"), names, split=True) == (
        "Both measures favour demo-lm-dense, on average: not on every prompt.")
    assert tt.prompt_by_prompt([("79%", "79%"), ("83%", "67%"), ("50%", "88%")], names) == (
        "Prompt by prompt it is mixed: demo-lm keeps more on 1 of the 3 prompts, demo-lm-dense on 1, 1 tie.")


def test_step_eight_states_the_work_it_compares():
    """The whole-model step: its sentence compares the two shares of weights its metrics show."""
    at = open_tour(step="8")
    assert not at.exception and not at.error
    shown = {m.label: m.value for m in at.metric}
    said = " ".join(texts(at))
    mlp, every = shown["Weights read: MLP only"], shown["Weights read: every projection"]
    word = "less than" if number(mlp) < number(every) else "more than" if number(mlp) > number(every) else "the same as"
    assert f"**{mlp}** of all the layers' weights, {word} every projection" in said and f"**{every}**" in said
    assert "embeddings" in said and "not counted" in said
