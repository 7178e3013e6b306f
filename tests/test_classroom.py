"""A classroom at once: one real Streamlit server, eight browser sessions (Playwright contexts in one
Chromium) opened at the same moment, each with its own model, policy and density, three of them
saving their run. Every session must show exactly its own numbers, those of the same spec analysed
alone in this process; none may wait forever or show an error. (bench/classroom.py times it.)

Seven of the eight models are loaded cold at the same moment, as at the start of a lesson: that is
how it found the races below (one global generator, lazy imports, and transformers' process-wide
patches while it builds a model), each now with a unit test of its own here."""
import math
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from bench.classroom import CLASS, launch, run_class, serve, stop, warm_up
from playwright.sync_api import sync_playwright
from conftest import shared
from sam_viz import analyze, load_model
from sam_viz.store import RunStore

ROOT = Path(__file__).resolve().parent.parent
NO_CHROMIUM = pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                                 reason="no Chromium found (apt-get install chromium); browser test skipped")


@pytest.fixture(scope="module")
def classroom(tmp_path_factory):
    db = tmp_path_factory.mktemp("runs") / "runs.sqlite"
    proc, base = serve({"SAM_VIZ_RUN_DB": str(db)})
    try:
        with sync_playwright() as p:
            browser = launch(p)
            warm_up(browser, base, CLASS[:1])                 # past the blank first load; models load at once
            sessions = run_class(browser, base, timeout_s=300)
            browser.close()
    finally:
        stop(proc)
    return sessions, RunStore(db)


LABELS = {"kl": "KL divergence", "top1_agreement": "Top-1 agreement", "cosine": "Embedding cosine",
          "max_abs_diff": "Largest hidden-state difference"}      # the Dense vs sparse page's names


def _read(text: str) -> tuple[float, float]:
    """A metric's text as a number and half its last shown digit ('0.0123 nats', '92.9%', '1.2e-05')."""
    number = text.split()[0]
    scale = 0.01 if number.endswith("%") else 1.0
    number = number.rstrip("%")
    mantissa, _, exp = number.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    return float(number) * scale, 0.5 * 10.0 ** (int(exp or 0) - decimals) * scale


@NO_CHROMIUM
@pytest.mark.parametrize("k", range(len(CLASS)), ids=[f"{s.page}-{s.model}" for s in CLASS])
def test_each_session_shows_its_own_numbers(classroom, k):
    sessions, store = classroom
    got, session = sessions[k], CLASS[k]
    assert got["stuck"] is None and got["exceptions"] == 0 and got["errors"] == []
    alone = analyze(shared(session.model), session.spec())
    if session.page == "runs":
        saved = store.load(got["saved"])
        assert saved.spec == session.spec()
        assert saved.tokens == alone.tokens and saved.density == alone.density
        for name, value in alone.compare.items():
            assert math.isclose(saved.compare[name], value, rel_tol=1e-5, abs_tol=1e-9), name
    else:
        shown = {label: _read(text) for label, text in got["metrics"].items() if label in LABELS.values()}
        assert shown.keys() == {LABELS[name] for name in alone.compare}
        for name, value in alone.compare.items():
            number, half_digit = shown[LABELS[name]]
            assert abs(number - value) <= half_digit * 1.001 + 1e-12, (name, number, value)


@NO_CHROMIUM
def test_the_saved_runs_are_exactly_the_savers(classroom):
    sessions, store = classroom
    savers = {s["saved"]: s["session"] for s in sessions if s["session"].page == "runs"}
    listed = {r["id"]: (r["model"], r["policy"], r["density"]) for r in store.list()}
    assert listed == {run_id: (s.model, s.policy, s.density) for run_id, s in savers.items()}


def test_tiny_models_loaded_at_once_in_many_sessions_have_the_weights_of_one_loaded_alone():
    """Sessions load models in threads; a tiny model's seed-0 weights must not take numbers that
    another thread's initialisation draws from torch's one global generator meanwhile."""
    names = ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-mixtral"]
    alone = {name: load_model(name).model.state_dict() for name in names}
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda name: (name, load_model(name).model.state_dict()), names * 3))
    for name, weights in together:
        assert all(torch.equal(t, weights[key]) for key, t in alone[name].items()), name


BUILDS = textwrap.dedent("""
    # A fresh process (nothing of transformers imported yet), as a server at the start of a lesson:
    # every built-in model loaded at once in threads, then each alone, in the same process.
    import threading
    import torch
    from concurrent.futures import ThreadPoolExecutor
    from sam_viz.models import BUILTIN_SPECS, load_model
    start = threading.Barrier(2 * len(BUILTIN_SPECS))

    def build(name):
        start.wait()
        try:
            return name, load_model(name).model.state_dict()
        except Exception as exc:
            return name, repr(exc)

    with ThreadPoolExecutor(2 * len(BUILTIN_SPECS)) as pool:
        together = list(pool.map(build, list(BUILTIN_SPECS) * 2))
    alone = {name: load_model(name).model.state_dict() for name in BUILTIN_SPECS}
    bad = []
    for name, weights in together:
        if isinstance(weights, str):
            bad.append(f"{name}: {weights[:300]}")
        elif any(t.is_meta or not torch.equal(t, alone[name][key]) for key, t in weights.items()):
            bad.append(f"{name}: weights differ from the model loaded alone")
    print(bad)
""")


def test_every_model_loaded_at_once_in_a_fresh_server_has_the_weights_of_one_loaded_alone():
    """transformers builds a model by patching process-wide state (torch.nn.init's functions, the
    default device, its lazy imports): two builds at once in threads gave a demo-lm with meta
    tensors, tiny models with other weights, and ImportErrors. One build at a time."""
    proc = subprocess.run([sys.executable, "-c", BUILDS], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


RACE = textwrap.dedent("""
    import threading
    import pages._shared                        # what every page imports first
    from sam_viz.figures import firing as plots
    import torch
    errors = []

    def draw():
        for _ in range(400):
            try:
                plots.go.Figure(plots.go.Heatmap(z=torch.rand(4, 4).numpy()))
            except Exception as exc:
                errors.append(repr(exc))

    t = threading.Thread(target=draw)
    t.start()
    import pandas                               # another session's page (Runs) imports pandas
    t.join()
    print(errors[:1])
""")


def test_a_figure_drawn_while_another_session_imports_pandas_does_not_fail():
    proc = subprocess.run([sys.executable, "-c", RACE], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
