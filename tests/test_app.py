"""AppTest of every page on minilm and tiny-llama; URL state; hostile query params; saved runs
reopened in a new process without any model being loaded."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "app.py")
PAGES = {"firing": "pages/firing.py", "density": "pages/density.py", "compare": "pages/compare.py",
         "routing": "pages/routing.py", "attribution": "pages/attribution.py", "speed": "pages/speed.py",
         "runs": "pages/runs.py"}
PROMPT = "The lighthouse keeper counted ships. The storm lasted all night."


@pytest.fixture(autouse=True)
def run_db(tmp_path, monkeypatch):
    db = tmp_path / "runs.sqlite"
    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(db))
    return db


def open_app(page="firing", timeout: float = 180, **params) -> AppTest:
    """Open one page (pages/<page>.py) with the URL's query params. (AppTest's switch_page neither
    reruns the entry script nor keeps bound query params, so each page script is opened directly:
    every page draws the shared sidebar itself, exactly as it does under app.py's navigation.)"""
    at = AppTest.from_file(str(ROOT / "pages" / f"{page}.py"), default_timeout=timeout)
    for key, value in params.items():
        at.query_params[key] = value
    return at.run()


def test_entry_script_navigates_to_the_firing_map():
    at = AppTest.from_file(APP, default_timeout=180)
    at.query_params["model"] = "tiny-llama"
    at.run()
    assert not at.exception and not at.error
    assert at.session_state["ctx"].analysis.spec.model == "tiny-llama"
    assert any("which neurons the sparse model computed" in t for t in chart_titles(at))


def charts(at) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def chart_titles(at) -> list[str]:
    out = []
    for spec in charts(at):
        title = spec.get("layout", {}).get("title", {})
        out.append(title.get("text", "") if isinstance(title, dict) else str(title))
    return out


EXPECTED_CHARTS = {"firing": 3, "density": 3, "compare": 2, "routing": 4, "attribution": 1, "speed": 1, "runs": 0}


@pytest.mark.parametrize("model", ["minilm", "tiny-llama"])
@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_runs(page, model):
    at = open_app(page, model=model, prompt=PROMPT)
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert len(at.get("plotly_chart")) >= EXPECTED_CHARTS[page]
    assert any("What am I looking at" in e.label for e in at.expander)
    assert at.session_state["ctx"].analysis.spec.model == model
    if page == "compare":
        assert "MLP weights read per token" in [m.label for m in at.metric]
    if page == "attribution":
        assert {"delta, dense", "delta, sparse"} <= {m.label for m in at.metric}
        assert sum("**Dense**" in m.value or "**Sparse**" in m.value for m in at.markdown) >= 2
    if page == "speed":
        assert {"MLP weights read per token", "Floor per token (read once)"} <= {m.label for m in at.metric}


def test_routing_page_compares_all_policies_and_shows_experts():
    at = open_app("routing", model="tiny-mixtral", prompt=PROMPT, density="0.25")
    if any(b.label.startswith("Train the predictor") for b in at.button):
        next(b for b in at.button if b.label.startswith("Train the predictor")).click().run()
    assert not at.exception and not at.error
    recall = next(c for c in charts(at) if "Recall of the oracle" in str(c["layout"]["title"]))
    assert {t["name"] for t in recall["data"]} == {"topk", "threshold", "predictor", "static"}
    titles = " ".join(chart_titles(at))
    assert "Router entropy" in titles and "Expert load" in titles and "co-firing" in titles


@pytest.mark.parametrize("params,warning,density", [
    (dict(density="abc"), "The link's density 'abc' is not a number; analysing 0.5.", 0.5),
    (dict(density="7"), "The link's density 7 is outside the slider's 0.05 to 1 range; analysing 1.", 1.0),
    (dict(density="0.33"), "The link's density 0.33 is not on the slider's 0.05 steps; analysing 0.35.", 0.35),
    (dict(policy="nope"), "The link's policy 'nope' is not one this app can use; showing policy topk.", 0.5)])
def test_link_values_the_app_cannot_use_are_named_not_dropped_silently(params, warning, density):
    """A density the slider cannot show becomes the nearest value it can (the issue asks for the
    nearest valid value), and the analysis uses what the slider shows."""
    at = open_app(model="tiny-llama", prompt=PROMPT, **params)
    assert not at.exception and not at.error
    assert [w.value for w in at.warning] == [warning]
    assert at.session_state["ctx"].spec.density == density == at.slider(key="density").value
    assert at.session_state["ctx"].spec.policy == "topk"


def test_valid_link_values_raise_no_warning():
    at = open_app(model="tiny-llama", prompt=PROMPT, policy="threshold", density="0.3")
    assert not at.warning and at.session_state["ctx"].spec.density == 0.3


def test_query_params_give_the_same_analysis_as_the_widgets():
    wanted = dict(model="tiny-llama", prompt=PROMPT, policy="threshold", density="0.3", layer="1")
    by_url = open_app(**wanted)
    assert not by_url.exception
    a_url = by_url.session_state["ctx"].analysis

    by_widgets = open_app()
    by_widgets.selectbox(key="model").set_value("tiny-llama").run()
    by_widgets.text_area(key="prompt").set_value(PROMPT).run()
    by_widgets.selectbox(key="policy").set_value("threshold").run()
    by_widgets.slider(key="density").set_value(0.3).run()
    by_widgets.number_input(key="layer").set_value(1).run()
    assert not by_widgets.exception
    a_widgets = by_widgets.session_state["ctx"].analysis
    assert a_widgets.spec == a_url.spec
    assert a_widgets.to_json() == a_url.to_json()
    assert by_widgets.number_input(key="layer").value == by_url.number_input(key="layer").value == 1
    assert charts(by_widgets) == charts(by_url)


@pytest.mark.parametrize("params,expect_error", [
    ({"density": "abc"}, None),
    ({"density": "7"}, None),
    ({"density": "-1"}, None),
    ({"model": "/etc/passwd"}, "outside the allowed roots"),
    ({"model": "../../x"}, "outside the allowed roots"),
    ({"model": "hf:../../etc"}, "not a valid Hugging Face model name"),
    ({"model": "tiny-llama", "layer": "999"}, None),
    ({"model": "tiny-llama", "token": "-5"}, None),
    ({"policy": "rm -rf"}, None),
    ({"run": "nonexistent"}, "no saved run"),
    ({"run": "' OR 1=1 --"}, "no saved run"),
    ({"model": "tiny-llama", "prompt": "word " * 20_000}, "tokens; the limit for tiny-llama is 512"),
    ({"model": "tiny-llama", "prompt": "x" * 100_000}, None),     # cut to 20,000 chars: one [UNK] token
])
def test_hostile_query_params(params, expect_error):
    at = open_app(**params)
    assert not at.exception, at.exception
    errors = " ".join(e.value for e in at.error)
    if expect_error:
        assert expect_error in errors
    else:
        assert not errors
        a = at.session_state["ctx"].analysis
        assert 0 < a.spec.density <= 1 and a.spec.policy in ("topk", "threshold", "dense")
        assert 0 <= at.number_input(key="layer").value < a.n_layers


def test_saved_run_reopens_after_restart_without_a_forward_pass(run_db):
    at = open_app("runs", model="tiny-llama", prompt=PROMPT, policy="threshold", density="0.4")
    save = next(b for b in at.button if b.label == "Save run")
    save.click().run()
    assert not at.exception
    run_id = at.success[0].value.split("`")[1]
    live = open_app("firing", run=run_id)
    assert not live.exception and not live.error
    expected = charts(open_app("firing", model="tiny-llama", prompt=PROMPT, policy="threshold", density="0.4"))
    assert charts(live) == expected

    script = textwrap.dedent(f"""
        import json, sys
        import sam_viz.models.loading, pages._shared, sam_viz.analysis
        def forbidden(*a, **k):
            raise AssertionError("a model was loaded or run")
        sam_viz.models.loading.load_model = pages._shared.load_model = forbidden
        sam_viz.analysis.forward = forbidden
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({APP!r}, default_timeout=120)
        at.query_params["run"] = {run_id!r}
        at.run()
        assert not at.exception, at.exception
        print(json.dumps([json.loads(el.proto.spec) for el in at.get("plotly_chart")]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SAM_VIZ_RUN_DB": str(run_db), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    reopened = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reopened == expected


def test_library_still_imports_no_streamlit():
    code = ("import sys, sam_viz, sam_viz.figures.firing, sam_viz.figures.quality, sam_viz.store, sam_viz.export, sam_viz.speed, "
            "sam_viz.figures.speed, sam_viz.figures.routing, sam_viz.figures.corpus, sam_viz.figures.claims, "
            "sam_viz.models, sam_viz.sparse_ops; "
            "assert 'streamlit' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_on_demand_sweep_and_continuation():
    at = open_app("density", model="tiny-llama", prompt=PROMPT, density="0.3")
    next(b for b in at.button if b.label == "Run the sweep").click().run()
    assert not at.exception
    sweep = next(c for c in charts(at) if "Output quality vs density" in str(c["layout"]["title"]))
    assert {t["name"] for t in sweep["data"]} >= {"topk", "threshold"}
    assert len(sweep["data"][0]["x"]) == 13

    at = open_app("compare", model="tiny-llama", prompt=PROMPT, density="0.3")
    next(b for b in at.button if b.label == "Continue with both models").click().run()
    assert not at.exception
    text = " ".join(m.value for m in at.markdown)
    assert "**Dense:**" in text and "**Sparse:**" in text
    assert any("agree" in c.value or "first differ" in c.value for c in at.caption)


def test_speed_page_times_the_run_and_charts_both_benchmarks(monkeypatch):
    from pages._shared import st
    from sam_viz import speed
    from sam_viz.benchmarks import decode, kernels

    st.cache_resource.clear()                                       # no results from an earlier test
    monkeypatch.setattr(kernels, "QUICK", dict(shapes={"toy": (32, 64)}, densities=(0.25, 0.5), calls=2))
    monkeypatch.setattr(kernels, "ROTATE_BYTES", 2**16)
    monkeypatch.setattr(decode, "QUICK", decode.TEST)              # the buttons run at test size
    at = open_app("speed", model="tiny-llama", prompt=PROMPT, policy="topk", density="0.5", kernel="cpu")
    assert not at.exception and not at.error
    assert at.metric[0].label.startswith("Dense forward (") and "cpu kernel" in at.metric[1].label
    delta = at.metric[1].proto.delta                                  # median of per-round ratios, its range
    lo_med_hi = re.fullmatch(rf"(\d+\.\d\d)x \((\d+\.\d\d)-(\d+\.\d\d) over {speed.ROUNDS} rounds\) vs dense", delta)
    assert lo_med_hi, delta
    med, lo, hi = map(float, lo_med_hi.groups())
    assert lo <= med <= hi
    next(b for b in at.button if b.label.startswith("Run kernel benchmark")).click().run()
    next(b for b in at.button if b.label.startswith("Run decode benchmark")).click().run()
    assert not at.exception and not at.error
    by_title = {str(c["layout"]["title"]["text"]): c for c in charts(at)}
    ms = next(c for t, c in by_title.items() if t.startswith("Sparse MLP kernel"))
    assert {t["name"] for t in ms["data"]} == {"dense", "cpu kernel", "floor (read once)"}
    assert len(ms["data"]) == 6 and ms["data"][0]["x"] == [0.25, 0.5]              # fp32 and bf16 panels
    note = next(m.value for m in at.markdown if m.value.startswith("**Why a speedup can pass 1/density.**"))
    assert "its floor (toy fp32)" in note and "its floor (toy bf16)" in note
    tok = next(c for t, c in by_title.items() if t.startswith("Greedy decode"))
    assert [t["x"] for t in tok["data"]] == [list(decode.DENSITIES)] * 3
    assert any("of an ideal" in c.value and "above 100%" in c.value for c in at.caption)
    assert {b.label for b in at.get("download_button")} >= {"Download the kernels results (JSON)"}
