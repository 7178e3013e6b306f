"""AppTest of what users meet around the analysis: a link's density put on the slider's steps, a
saved run that stays the saved run from page to page, feedback while a first calibration trains
(and nothing of it left afterwards), a prompt over the token limit, and the Runs page of a link with a layer."""
import re
import sqlite3
import weakref
from dataclasses import replace

import pytest
from streamlit.delta_generator import DeltaGenerator
from streamlit.testing.v1 import AppTest

from conftest import shared
from sam_viz import RunSpec, analyze
from sam_viz.store import RunStore
from sam_viz.sparse_ops import calibration
from test_app import APP, PAGES, PROMPT, open_app, run_db  # noqa: F401 - run_db: a fresh run store per test


@pytest.mark.parametrize("raw,shown", [("0.33", 0.35), ("0.32", 0.3), ("0", 0.05), ("-1", 0.05), ("7", 1.0),
                                       ("abc", 0.5), ("nan", 0.5), ("inf", 0.5)])
def test_a_links_density_is_analysed_at_the_value_the_slider_shows(raw, shown):
    at = open_app(model="tiny-llama", prompt=PROMPT, density=raw)
    assert not at.exception and not at.error
    assert at.slider(key="density").value == shown
    assert at.session_state["ctx"].spec.density == shown
    assert at.session_state["ctx"].analysis.spec.density == shown
    assert len(at.warning) == 1 and f"analysing {shown:g}." in at.warning[0].value and raw in at.warning[0].value
    if raw not in ("0", "-1", "7"):       # Streamlit drops a value out of the slider's range from the URL
        assert float(at.query_params.get("density", 0.5)) == shown   # the URL reproduces what is shown


def test_a_density_on_the_slider_raises_no_warning():
    at = open_app(model="tiny-llama", prompt=PROMPT, density="0.35")
    assert not at.warning and at.session_state["ctx"].spec.density == 0.35


@pytest.fixture
def saved_run(run_db):  # noqa: F811 - the fixture imported from test_app
    spec = RunSpec(prompt=PROMPT, model="tiny-llama", policy="threshold", density=0.4)
    return RunStore(run_db).save(analyze(shared("tiny-llama"), spec)), spec


def _no_model(monkeypatch):
    """Fail the test if anything loads or runs a model from here on."""
    import pages._shared

    def forbidden(*args, **kwargs):
        raise AssertionError("a saved run ran the model")

    monkeypatch.setattr(pages._shared, "cached_model", forbidden)
    monkeypatch.setattr(pages._shared, "analyze", forbidden)


def _saved_line(at) -> list[str]:
    return [i.value for i in at.info if i.value.startswith("Saved run `")]


def test_a_saved_run_stays_the_saved_run_on_every_page(saved_run, monkeypatch):
    """A menu click opens the next page without `run` in the URL (AppTest's switch_page keeps no
    bound query params either); the session still shows the saved run, and the URL gets it back."""
    run_id, spec = saved_run
    _no_model(monkeypatch)
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params["run"] = run_id
    at.run()
    for page in PAGES.values():
        at.switch_page(page)
        at.query_params.clear()
        at.run()
        assert not at.exception and not at.error, (page, at.exception)
        assert at.session_state["ctx"].run_id == run_id, page
        assert at.session_state["ctx"].spec == spec
        assert len(_saved_line(at)) == 1 and run_id in _saved_line(at)[0], page
        assert at.query_params.get("run") == run_id, page
    assert "Save run" not in [b.label for b in at.button]              # the last page: Runs


def test_changing_a_setting_leaves_the_saved_run_for_good(saved_run):
    run_id, spec = saved_run
    at = open_app("firing", run=run_id)
    assert at.session_state["ctx"].run_id == run_id
    at.slider(key="density").set_value(0.45).run()
    assert not at.exception and not at.error
    ctx = at.session_state["ctx"]
    assert ctx.run_id is None and ctx.spec == replace(spec, density=0.45) and "run" not in at.query_params
    at.slider(key="density").set_value(0.4).run()                      # back to the saved settings: still live
    assert at.session_state["ctx"].run_id is None and not _saved_line(at)


def test_analyse_live_leaves_the_saved_run_with_the_same_settings(saved_run):
    run_id, spec = saved_run
    at = open_app("density", run=run_id)
    assert any("has no sweep" in i.value for i in at.info)
    next(b for b in at.button if b.label == "Analyse live").click().run()
    assert not at.exception and not at.error
    assert at.session_state["ctx"].run_id is None and at.session_state["ctx"].spec == spec
    assert "run" not in at.query_params and not _saved_line(at)
    assert "Run the sweep" in [b.label for b in at.button]


def test_a_corrupt_saved_run_is_one_sentence_and_a_live_analysis(saved_run, run_db):  # noqa: F811
    run_id, spec = saved_run
    with sqlite3.connect(run_db) as db:
        db.execute("UPDATE runs SET blob = ? WHERE id = ?", (b"\x00" * 64, run_id))
    at = open_app("firing", run=run_id)
    assert not at.exception
    shown = [re.sub(r"\\(.)", r"\1", e.value) for e in at.error]        # as markdown shows it: \_ reads _
    assert shown == [f"Saved run '{run_id}' cannot be opened (saved run is corrupt or from an "
                     "incompatible version); showing a live analysis instead."]
    assert all("_" not in e.value.replace("\\_", "") for e in at.error)    # an id's _ is escaped, not italics
    assert at.session_state["ctx"].run_id is None and "run" not in at.query_params


def test_saving_the_same_view_twice_gives_one_run():
    at = open_app("runs", model="tiny-llama", prompt=PROMPT, density="0.3")
    ids = []
    for _ in range(2):
        next(b for b in at.button if b.label == "Save run").click().run()
        assert not at.exception and not at.error
        ids.append(at.success[0].value.split("`")[1])
    assert ids[0] == ids[1]
    assert [r["id"] for r in RunStore().list()] == [ids[0]]


def test_the_runs_page_of_a_link_exports_and_links_the_links_layer(monkeypatch):
    """/runs?layer=2 (no layer box on that page): the HTML report's firing map and the link to this
    view are of layer 2, as the firing map of the same link shows it."""
    data = {}
    button = DeltaGenerator.download_button

    def record(self, label, payload, *args, **kwargs):
        data[label] = payload
        return button(self, label, payload, *args, **kwargs)
    monkeypatch.setattr(DeltaGenerator, "download_button", record)
    at = open_app("runs", model="minilm", prompt=PROMPT, layer="2")
    assert not at.exception and not at.error
    html = data["HTML report"]()
    assert "Firing map, layer 2" in html and "Firing map, layer 0" not in html
    assert "layer=2" in at.code[0].value


def test_a_first_calibration_says_what_it_trains_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """predictor on a model with no stored calibration: the progress names the step and the layer;
    after the run no progress bar or status box is left. (Fewer calibration texts and training
    steps than the real thing, only so the test is quick; the labels are the same.)"""
    monkeypatch.setenv("SAM_VIZ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibration, "_CALIBRATIONS", weakref.WeakKeyDictionary())
    texts = calibration.calibration_texts()
    monkeypatch.setattr(calibration, "calibration_texts", lambda: {**texts, "train": texts["train"][:40]})
    train = calibration.train_predictor
    monkeypatch.setattr(calibration, "train_predictor", lambda x, h, s: train(x, h, replace(s, steps=3)))
    seen = []
    progress = DeltaGenerator.progress

    def record(self, value, text=None, *args, **kwargs):
        seen.append(text or "")
        return progress(self, value, text, *args, **kwargs)

    monkeypatch.setattr(DeltaGenerator, "progress", record)
    at = open_app(model="tiny-llama", prompt="A first calibration, for this test only.", policy="predictor")
    assert not at.exception and not at.error
    assert at.session_state["ctx"].spec.policy == "predictor"
    calibrating = [t for t in seen if t.startswith("Calibrating tiny-llama for the first time (")]
    for layer in (1, 2):
        assert any(t.endswith(f"training the predictor for layer {layer} of 2") for t in calibrating), seen
    assert any("collecting activations on the calibration text (batch 1 of 3)" in t for t in calibrating)
    assert any(t.startswith("Analysing the prompt on tiny-llama") for t in seen)
    assert not at.get("progress") and not at.status
    assert not [e.label for e in at.expander if "Analy" in e.label or "Calibrat" in e.label]


def test_a_prompt_over_the_token_limit_can_be_cut_to_the_limit():
    words = " ".join(f"word{i % 7}" for i in range(700))                # about 1,400 tokens for tiny-llama
    at = open_app(model="tiny-llama", prompt=words)
    assert len(at.error) == 1 and "the limit for tiny-llama is 512" in at.error[0].value
    assert not at.get("progress") and not at.status                    # only the error is left of the failed run
    next(b for b in at.button if b.label == "Analyse the first 512 tokens").click().run()
    assert not at.exception and not at.error
    prompt = at.session_state["ctx"].spec.prompt
    assert words.startswith(prompt) and len(prompt) < len(words)
    loaded = shared("tiny-llama")
    assert loaded.encode(prompt)["input_ids"].shape[1] <= 512 < loaded.encode(words)["input_ids"].shape[1]
    assert len(at.session_state["ctx"].analysis.tokens) == loaded.encode(prompt)["input_ids"].shape[1]
    assert at.text_area(key="prompt").value == prompt


def test_a_failed_sweep_leaves_its_error_and_no_progress_bar(monkeypatch):
    """Long work on a page that fails part way: one error sentence, and its progress bar is gone."""
    import sam_viz
    from sam_viz import InputError

    def failing(loaded, spec, policies, progress):
        progress(0.3, "threshold at density 0.2")
        raise InputError("the sweep failed on purpose")

    monkeypatch.setattr(sam_viz, "density_sweep", failing)
    at = open_app("density", model="tiny-llama", prompt=PROMPT, density="0.3")
    next(b for b in at.button if b.label == "Run the sweep").click().run()
    assert not at.exception
    assert [e.value for e in at.error] == ["the sweep failed on purpose"]
    assert not at.get("progress")


def test_train_the_predictor_goes_once_it_has_trained(tmp_path, monkeypatch):
    """Routing on a model with no stored calibration: the button, then its click trains (in this run) and
    the page shows all four policies without the button."""
    monkeypatch.setenv("SAM_VIZ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(calibration, "_CALIBRATIONS", weakref.WeakKeyDictionary())
    at = open_app("routing", model="tiny-llama", prompt=PROMPT, kernel="reference")
    train = [b for b in at.button if b.label.startswith("Train the predictor")]
    assert len(train) == 1
    train[0].click().run()
    assert not at.exception and not at.error
    assert not [b for b in at.button if b.label.startswith("Train the predictor")]
    assert calibration.get_calibration(shared("tiny-llama"), train=False) is not None


def test_prepare_the_static_policy_goes_when_clicked(monkeypatch):
    """The tour's step 7 on a demo LM with no static set: its note and button, gone in the run its click
    starts (the calibration stands in: every analysis is one small run, the set never stored)."""
    import pages._shared
    from sam_viz import sparse_ops

    small = analyze(shared("tiny-llama"), RunSpec(prompt="One two three.", model="tiny-llama", kernel="reference"))
    monkeypatch.setattr(pages._shared, "cached_analysis", lambda spec: small)
    monkeypatch.setattr(sparse_ops, "get_calibration", lambda loaded, train=True, **kwargs: None)
    at = open_app("tour", step="7")
    assert [b.label for b in at.button].count("Prepare the static policy") == 1
    assert any("first needs its neuron set" in i.value for i in at.info)
    at.button(key="tour_calibrate").click().run()
    assert not at.exception and not at.error
    assert "Prepare the static policy" not in [b.label for b in at.button]
    assert not any("first needs its neuron set" in i.value for i in at.info)
