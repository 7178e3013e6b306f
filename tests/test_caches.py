"""Caches: an attribution is computed once per (run, method, target, steps) and kept on the shared
analysis, so a rerun, another session opening the same view, or going back to earlier settings
computes nothing; a new method, target, step count or run computes once. Counted as calls of
sam_viz.attribution.attribute across AppTest sessions (each AppTest is a session of its own).
Also: a run with the dense policy attributes (there is no neuron selection to hook, and the sparse
side is the dense model exactly). Memory over many analyses is bench/memory.py's (too slow for here)."""
import pytest

import pages._shared
import sam_viz.attribution
from conftest import shared
from sam_viz import RunSpec
from test_app import PROMPT, open_app, run_db  # noqa: F401 - run_db: a fresh run store per test

LINK = dict(model="tiny-llama", prompt=PROMPT, policy="topk", density="0.3")


@pytest.fixture
def calls(monkeypatch):
    """Every call of attribute (its spec and keyword arguments), from cold caches."""
    pages._shared.st.cache_resource.clear()
    seen, real = [], sam_viz.attribution.attribute

    def counting(loaded, spec, **kwargs):
        seen.append({"spec": spec, **kwargs})
        return real(loaded, spec, **kwargs)
    monkeypatch.setattr(sam_viz.attribution, "attribute", counting)
    return seen


def _widget(elements, label):
    return next(e for e in elements if e.label == label)


def test_each_run_method_target_and_steps_is_computed_once_across_sessions(calls):
    assert not open_app("attribution", **LINK).exception and len(calls) == 1
    at = open_app("attribution", **LINK)                             # a second session: kept
    assert not at.exception and len(calls) == 1
    _widget(at.number_input, "Steps").set_value(4).run()             # 50 -> 4 steps: new
    assert not at.exception and len(calls) == 2 and calls[-1]["steps"] == 4
    _widget(at.number_input, "Steps").set_value(50).run()            # back to 50: kept
    assert len(calls) == 2
    _widget(at.selectbox, "Next token to explain").set_value(1).run()  # the second most likely token: new
    assert len(calls) == 3 and calls[-1]["target_id"] != calls[0]["target_id"]
    _widget(at.selectbox, "Next token to explain").set_value(0).run()
    assert len(calls) == 3
    _widget(at.radio, "Method").set_value("ixg").run()
    assert not at.exception and len(calls) == 4 and calls[-1]["method"] == "ixg"
    other = open_app("attribution", **{**LINK, "density": "0.5"})   # another run: its own attributions
    assert not other.exception and len(calls) == 5 and calls[-1]["spec"].density == 0.5


def test_a_dense_run_attributes_and_its_sparse_side_is_the_dense_model():
    spec = RunSpec(prompt=PROMPT, model="tiny-llama", policy="dense", density=1.0)
    a = sam_viz.attribution.attribute(shared("tiny-llama"), spec, method="ixg")
    assert a.sparse == a.dense and a.mass_lost == [0.0] * len(a.mass_lost)
    at = open_app("attribution", **{**LINK, "policy": "dense", "density": "1"})
    assert not at.exception and not at.error

