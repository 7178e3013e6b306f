"""AppTest of the Corpus page on hand-built profiles (SAM_VIZ_PROFILE_DIR in tmp_path): no profiles,
the overview, a neuron's share link opened with no model loaded, bad link params, contexts full of
markdown signs shown as text, and the Firing map's link to the neuron over a corpus."""
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from test_app import open_app, run_db  # noqa: F401 - run_db, autouse: a fresh run store per test
from test_profile_view import PID, write_profile

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def profiles(tmp_path, monkeypatch):
    root = tmp_path / "profiles"
    monkeypatch.setenv("SAM_VIZ_PROFILE_DIR", str(root))
    return root


def open_corpus(**params) -> AppTest:
    return open_app("corpus", timeout=120, **params)


def titles(at) -> list[str]:
    return [json.loads(el.proto.spec)["layout"].get("title", {}).get("text", "") for el in at.get("plotly_chart")]


def test_no_profiles_says_so_and_offers_to_make_one(profiles):
    at = open_corpus()
    assert not at.exception and not at.error
    assert any("No profiles yet" in i.value for i in at.info)
    assert any(b.label.startswith("Profile ") for b in at.button)


def test_overview_of_a_hand_built_profile(profiles):
    write_profile(profiles)
    at = open_corpus()
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Dead neurons"] == "5 of 16"                  # layer 0: units 3..7
    assert metrics["Always on"] == "1"
    assert metrics["Neurons that cover 80% of firing"] == "43.8%"     # 7 of 16 units, by hand
    assert {"Hot neurons: how few carry the firing", "Firing frequency, neurons sorted per layer"} <= set(titles(at))
    assert at.query_params["profile"] == PID and "neuron" not in at.query_params


def test_neuron_share_link_opens_the_view_without_a_model(profiles, monkeypatch):
    import sam_viz.models.loading
    import pages._shared
    import sam_viz

    write_profile(profiles)
    refuse = lambda *a, **k: pytest.fail("the page loaded a model")  # noqa: E731
    for module, name in ((sam_viz.models.loading, "load_model"), (sam_viz, "load_model"), (pages._shared, "load_model"),
                         (pages._shared, "cached_model"), (pages._shared, "cached_analysis")):
        monkeypatch.setattr(module, name, refuse)
    at = open_corpus(profile=PID, layer="0", neuron="0")
    assert not at.exception and not at.error and not at.warning
    assert at.number_input(key="corpus_layer").value == 0 and at.number_input(key="corpus_neuron").value == 0
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Fires (oracle top-k at 0.25)"] == "100.0%" and metrics["Selected by threshold"] == "90.0%"
    assert {"Layer 0, neuron 0: distribution of h", "Layer 0, neuron 0: logit effects"} <= set(titles(at))
    assert "Dead neurons" not in metrics                 # only the open tab runs
    # correlated units link to their own view: unit 0 fires on every token, so phi is undefined; unit 1's
    at = open_corpus(profile=PID, layer="0", neuron="1")
    links = [m.value for m in at.markdown if m.value.startswith("[neuron ")]
    assert len(links) == 1 and "neuron 2 · phi -1.00" in links[0] and "neuron=2" in links[0]


def test_contexts_with_markdown_signs_are_shown_as_text(profiles):
    write_profile(profiles)
    at = open_corpus(profile=PID, layer="0", neuron="0")
    rows = [m.value for m in at.markdown if "<mark>" in m.value]
    assert len(rows) == 3 + 5                            # 3 top contexts, 1 sample per quantile band
    row = rows[0]
    assert "&#36;" in row and "&#42;bold&#42;" in row and "&lt;" in row and "<b>" not in row
    assert " <mark>&#36;</mark>" in row                 # the firing token, " $" (its space left unmarked)
    opened = [b for b in at.button if b.label == "Open in firing map"]
    assert len(opened) == 3 + 5
    opened[0].click().run()                               # the click switches to the firing map (AppTest stays)
    s = at.session_state
    got = {k: s[k] for k in ("model", "prompt", "policy", "density", "layer", "token")}
    assert got == dict(model="tiny-llama", prompt="The shirt costs $20 *bold* <b> and", policy="threshold",
                       density=0.25, layer=0, token=3)    # the profile's settings, the context's text and token


@pytest.mark.parametrize("params, message", [
    (dict(profile="../etc"), "is not a profile id"),
    (dict(profile="ffffffffffff"), "There is no profile with id 'ffffffffffff'"),
    (dict(profile=PID, layer="x"), "The link's layer 'x' is not a number"),
    (dict(profile=PID, layer="9", neuron="2"), "The link's layer 9 is out of range"),
    (dict(profile=PID, layer="1", neuron="-1"), "The link's neuron -1 is out of range"),
])
def test_bad_link_params_are_one_sentence(profiles, params, message):
    write_profile(profiles)
    at = open_corpus(**params)
    assert not at.exception
    said = [e.value for e in (*at.error, *at.warning)]
    assert len(said) == 1 and message in said[0], said


def test_firing_map_links_to_the_neuron_over_a_corpus(profiles):
    write_profile(profiles, model="tiny-llama")
    at = open_app("firing", model="tiny-llama", prompt="One two three.", layer="1")
    assert not at.exception and not at.error
    a = at.session_state["ctx"].analysis
    strongest = int(a.dense_layers[1].activations[0].abs().argmax())
    link = [m.value for m in at.markdown if m.value.startswith("[This neuron over a corpus")]
    assert link and f"profile={PID}&layer=1&neuron={strongest}" in link[0]


def test_make_a_profile_calls_the_writer_with_the_sidebar_and_opens_the_result(profiles, monkeypatch):
    """The button hands the sidebar's model, policy, density and kernel to build_profile with a
    progress callback, and picks the profile it made. (The writer stands in here, writing a profile by
    hand; the end-to-end test with the real one runs the CLI.)"""
    import sam_viz.profile

    calls = []

    def writer(spec, source, *, progress=None, **settings):
        calls.append((spec, source, settings))
        for done in (0, 50, 100):
            progress(done, 100, "tokens/s 10 · ETA 1 s")
        write_profile(profiles, "abcdef012345", model=spec, created="2030-01-01T00:00:00+00:00")
        return {"id": "abcdef012345"}

    write_profile(profiles)                                # an older profile, listed first before the new one
    monkeypatch.setattr(sam_viz.profile, "build_profile", writer, raising=False)
    at = open_corpus(model="tiny-llama", policy="threshold", density="0.3")
    at.button[[b.label for b in at.button].index("Profile tiny-llama")].click().run()
    assert not at.exception and not at.error
    assert calls == [("tiny-llama", "builtin:calibration", dict(policy="threshold", density=0.3,
                                                                 kernel=at.session_state["kernel"]))]
    assert at.selectbox(key="corpus_profile").value == "abcdef012345"
    assert at.query_params["profile"] == "abcdef012345"


def test_a_damaged_profile_is_one_sentence(profiles):
    write_profile(profiles)
    (profiles / PID / "neurons.parquet").write_bytes(b"PAR1 damaged")
    at = open_corpus(profile=PID, layer="0", neuron="0")
    assert not at.exception
    assert len(at.error) == 1
    assert "its neurons.parquet is damaged (it is not a readable Parquet table)." in at.error[0].value


def test_an_encoder_s_missing_logit_effects_are_said_once(profiles):
    write_profile(profiles, kind="encoder")
    at = open_corpus(profile=PID, layer="0", neuron="0")
    assert not at.exception and not at.error
    said = "no logit effects"
    texts = [el.value for kind in ("caption", "markdown", "info") for el in at.get(kind)]
    drawn = [a.get("text", "") for el in at.get("plotly_chart")
             for a in json.loads(el.proto.spec)["layout"].get("annotations", [])]
    assert sum(said in t for t in texts + drawn) == 1
    assert "Layer 0, neuron 0: distribution of h" in titles(at)
