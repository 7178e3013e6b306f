"""AppTest of the Attribution page: results kept per analysis (a widget that only changes the view
computes nothing again), the encoders' query bound to the URL, values within rounding noise not
drawn, and a saved run's attribution shown without the model; the rows of tokens on one colour scale
and a convergence delta below float32's resolution shown as such."""
import dataclasses
import math
import re

import pytest

import pages._shared
import sam_viz.attribution
from test_app import charts, chart_titles, open_app

PROMPT = "The lighthouse keeper counted ships. The storm lasted all night."
LIVE = dict(model="tiny-llama", prompt=PROMPT, policy="topk", density="0.5")


@pytest.fixture
def calls(monkeypatch):
    """Every call of sam_viz.attribution.attribute (its keyword arguments), from a cold cache."""
    pages._shared.st.cache_resource.clear()
    seen, real = [], sam_viz.attribution.attribute

    def counting(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sam_viz.attribution, "attribute", counting)
    return seen


def test_changing_only_the_layer_does_not_attribute_again(calls):
    at = open_app("attribution", **LIVE)
    assert not at.exception and not at.error and len(calls) == 1
    at.number_input(key="layer").set_value(1).run()
    assert not at.exception and not at.error
    assert len(calls) == 1
    assert any(t.startswith("Layer 1: neurons") for t in chart_titles(at))
    at.radio[0].set_value("ixg").run()                               # another method: computed once
    at.radio[0].set_value("ig").run()                                # and back: kept
    assert [c["method"] for c in calls] == ["ig", "ixg"]
    again = open_app("attribution", **LIVE)                          # another session, the same analysis
    assert not again.exception and len(calls) == 2


def test_the_query_is_in_the_url_and_a_query_equal_to_the_prompt_is_not_drawn(calls):
    at = open_app("attribution", model="tiny-bert", prompt=PROMPT)
    assert not at.exception and not at.error
    assert calls[-1]["query"] == "The lighthouse keeper counted ships."          # the default: first sentence
    assert not at.info and sum("**Dense**" in m.value for m in at.markdown) == 1

    at = open_app("attribution", model="tiny-bert", prompt=PROMPT, query=PROMPT)
    at.radio[0].set_value("ixg").run()
    assert not at.exception and not at.error
    assert calls[-1]["query"] == PROMPT and at.text_input(key="query").value == PROMPT
    infos = [i.value for i in at.info]
    assert "The dense model's token attributions are within rounding noise of zero (the output's gradient " \
           "vanishes at the input), so they are not drawn." in infos
    assert any(i.startswith("The dense model's neuron attributions in layer 0 are within rounding noise") for i in infos)
    assert any(i.startswith("Attribution mass lost is left out for layers 0, 1") for i in infos)
    rows = [m.value for m in at.markdown if m.value.startswith("**")]
    assert not any("**Dense**" in r or "**Sparse - dense**" in r for r in rows) and any("**Sparse**" in r for r in rows)
    neurons = next(c for c in charts(at) if "neurons carrying" in c["layout"]["title"]["text"])
    assert [t["name"] for t in neurons["data"]] == ["sparse"]


def notes(at) -> list[str]:
    """The page's info boxes, less the line every page of a saved run shows."""
    return [i.value for i in at.info if not i.value.startswith("Saved run `")]


def test_a_saved_run_shows_the_attribution_computed_before_saving(calls, monkeypatch):
    live = open_app("attribution", **LIVE)
    runs = open_app("runs", **LIVE)
    next(b for b in runs.button if b.label == "Save run").click().run()
    run_id = runs.success[0].value.split("`")[1]

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was needed")

    monkeypatch.setattr(sam_viz.attribution, "attribute", forbidden)
    monkeypatch.setattr(pages._shared, "cached_model", forbidden)
    saved = open_app("attribution", run=run_id)
    assert not saved.exception and not saved.error and not notes(saved)
    assert "Saved attribution" in [s.label for s in saved.selectbox]
    assert charts(saved) == charts(live)
    assert [m.value for m in saved.markdown] == [m.value for m in live.markdown]
    assert [(m.label, m.value) for m in saved.metric] == [(m.label, m.value) for m in live.metric]


def test_a_run_saved_without_an_attribution_says_so(calls):
    runs = open_app("runs", **LIVE)
    next(b for b in runs.button if b.label == "Save run").click().run()
    saved = open_app("attribution", run=runs.success[0].value.split("`")[1])
    assert not saved.exception and not saved.error and not calls
    assert notes(saved) == [
        "This run was saved without an attribution, and computing one needs the model: "
        "**Analyse live** above runs these settings on the model."]


def alphas(row: str) -> list[float]:
    return [float(a) for a in re.findall(r"rgba\(\d+,\d+,\d+,([\d.]+)\)", row)]


def test_the_difference_row_is_on_the_model_rows_scale_and_a_zero_delta_reads_as_below_float32(monkeypatch):
    """A delta of 0 (the sparse IG of minilm on the default prompt gives one) reads as below float32's
    spacing at f, 2^(floor(log2 |f|) - 23); the sparse - dense row's colours are |difference| over the
    largest |attribution| of the dense and sparse rows (not over its own largest, which is always full)."""
    pages._shared.st.cache_resource.clear()
    real = sam_viz.attribution.attribute
    monkeypatch.setattr(sam_viz.attribution, "attribute",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), delta_sparse=0.0))
    at = open_app("attribution", **LIVE)
    assert not at.exception and not at.error
    a = at.session_state["ctx"].analysis.attributions[-1]
    spacing = 2.0 ** (math.floor(math.log2(max(map(abs, a.f_sparse)))) - 23)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["delta, sparse"] == f"< {spacing:.1e}"
    rows = {m.value.split("**")[1]: m.value for m in at.markdown if m.value.startswith("**")}
    top = max(abs(v) for v in a.dense + a.sparse)
    diff = [abs(s - d) for d, s in zip(a.dense, a.sparse)]
    assert alphas(rows["Sparse - dense"]) == pytest.approx([min(1.0, v / top) for v in diff], abs=0.006)
    assert any(f"Largest |sparse - dense|: {max(diff):.3g}" in c.value for c in at.caption)
