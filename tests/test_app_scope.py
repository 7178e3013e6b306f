"""The run's scope and allocation in the app (issue 22, section 5): the sidebar's Scope and Allocation
boxes bound to the URL, the Policy box offering the scope's policies, a link's invalid combination
said in one sentence, and saved runs, exports and share links that carry both."""
import csv
import io
import json

import pytest

from conftest import shared
from sam_viz import RunSpec, analyze
from sam_viz.export import CSV_COLUMNS, to_csv, to_html, to_json
from sam_viz.store import RunStore
from test_app import PROMPT, charts, open_app

TEAL_LINK = dict(model="tiny-llama", prompt=PROMPT, scope="all", policy="teal", allocation="uniform", density="0.5")


def spec_of(at) -> RunSpec:
    return at.session_state["ctx"].spec


def test_a_teal_uniform_link_reproduces_the_view_set_by_the_widgets():
    by_url = open_app(**TEAL_LINK)
    assert not by_url.exception and not by_url.error and not by_url.warning, [w.value for w in by_url.warning]
    spec = spec_of(by_url)
    assert (spec.scope, spec.policy, spec.allocation, spec.density) == ("all", "teal", "uniform", 0.5)
    assert by_url.selectbox(key="scope").value == "all" and by_url.selectbox(key="allocation").value == "uniform"
    assert list(by_url.selectbox(key="policy").options) == ["dense", "topk", "teal", "wina"]
    assert 0 < by_url.session_state["ctx"].analysis.model_density < 1

    by_widgets = open_app(model="tiny-llama", prompt=PROMPT)
    assert list(by_widgets.selectbox(key="policy").options) == ["dense", "topk", "threshold", "predictor", "static"]
    assert not [s for s in by_widgets.selectbox if s.key == "allocation"]      # topk: no allocation box
    by_widgets.selectbox(key="scope").set_value("all").run()
    by_widgets.selectbox(key="policy").set_value("teal").run()
    by_widgets.selectbox(key="allocation").set_value("uniform").run()
    assert not by_widgets.exception and not by_widgets.error
    assert spec_of(by_widgets) == spec
    assert by_widgets.session_state["ctx"].analysis.to_json() == by_url.session_state["ctx"].analysis.to_json()
    assert charts(by_widgets) == charts(by_url)


@pytest.mark.parametrize("params,warning,want", [
    (dict(scope="all", policy="threshold"),
     "Policy threshold runs under scope mlp only; under scope all this view shows policy topk.", ("all", "topk")),
    (dict(scope="mlp", policy="wina"),
     "Policy wina runs under scope all only; under scope mlp this view shows policy topk.", ("mlp", "topk")),
    (dict(policy="teal"),
     "Policy teal runs under scope all only; under scope mlp this view shows policy topk.", ("mlp", "topk")),
    (dict(scope="everything", policy="topk"),
     "The link's scope 'everything' is not one this app can use; showing scope mlp.", ("mlp", "topk")),
    (dict(scope="all", policy="teal", allocation="best"),
     "The link's allocation 'best' is not one of uniform or greedy; showing allocation greedy.", ("all", "teal")),
])
def test_a_link_that_does_not_fit_the_scope_is_one_sentence(params, warning, want):
    at = open_app(model="tiny-llama", prompt=PROMPT, density="0.5", **params)
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert [w.value for w in at.warning] == [warning]
    assert (spec_of(at).scope, spec_of(at).policy) == want


def test_share_link_carries_scope_and_allocation():
    at = open_app("runs", **TEAL_LINK)
    assert not at.exception and not at.error
    link = at.code[0].value
    assert "scope=all" in link and "policy=teal" in link and "allocation=uniform" in link
    at = open_app("runs", model="tiny-llama", prompt=PROMPT, policy="threshold", density="0.3")
    assert "scope=mlp" in at.code[0].value and "allocation" not in at.code[0].value   # means nothing for threshold


@pytest.fixture(scope="module")
def teal_run():
    spec = RunSpec(prompt="The cat sat on the mat.", model="tiny-llama", policy="teal", density=0.5, scope="all",
                   allocation="uniform")
    return analyze(shared("tiny-llama"), spec)


def test_a_saved_run_keeps_scope_and_allocation(teal_run, tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    back = store.load(store.save(teal_run))
    assert (back.spec.scope, back.spec.allocation, back.spec.policy) == ("all", "uniform", "teal")
    assert back.spec == teal_run.spec
    assert back.model_density == teal_run.model_density and back.projections == teal_run.projections


def test_exports_carry_scope_and_allocation(teal_run):
    doc = json.loads(to_json(teal_run))
    assert (doc["spec"]["scope"], doc["spec"]["allocation"]) == ("all", "uniform")
    assert doc["model_density"] == teal_run.model_density
    assert doc["layers"][0]["projections"] == teal_run.projections[0]
    assert set(doc["layers"][0]["projections"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    rows = list(csv.DictReader(io.StringIO(to_csv(teal_run))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {(r["scope"], r["allocation"]) for r in rows} == {("all", "uniform")}
    html = to_html(teal_run, [])
    assert "<td>all</td>" in html and "<td>uniform</td>" in html
    assert "whole-model density (embeddings excluded)" in html
