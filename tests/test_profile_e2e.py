"""A profile written by `build_profile` and read by the reader and the Corpus page: the two sides of
the on-disk contract meet (each side's own tests use hand-built tables or hand computations).

Independent reference: under `topk` at density d every layer's oracle picks exactly k = the policy's
k(d_ff) neurons per token, so the fire counts of a layer sum to tokens x k, the achieved density is
k / d_ff, and the model-wide hot curve ends at 1."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from sam_viz.profile import build_profile, list_profiles, open_profile
from sam_viz.sparse_ops.policy import Policy
from test_app import run_db  # noqa: F401 - autouse: a fresh run store per test

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    root = tmp_path_factory.mktemp("profiles")
    manifest = build_profile("tiny-llama", "builtin:calibration", density=0.25, context=32, max_tokens=512, root=root)
    return root, manifest


def test_the_reader_opens_what_the_writer_stored(profile):
    root, manifest = profile
    assert [m["id"] for m in list_profiles(root)] == [manifest["id"]]
    p = open_profile(manifest["id"], root=root)
    k = Policy("topk", 0.25).k(manifest["d_ff"])
    table = pd.read_parquet(root / manifest["id"] / "neurons.parquet")
    fire = table.pivot(index="layer", columns="neuron", values="fire_count").to_numpy()
    assert fire.shape == (manifest["n_layers"], manifest["units"])
    np.testing.assert_array_equal(fire.sum(axis=1), manifest["tokens"] * k)
    np.testing.assert_allclose(p.layer_table()["density"], k / manifest["d_ff"], rtol=1e-9)
    curve = p.hot_curve()
    assert curve.selections[-1] == pytest.approx(1.0) and curve.selections[0] == 0
    view = p.neuron(0, int(np.argmax(fire[0])))
    assert view.fire_count == fire[0].max() and (view.examples["band"] == "top").any()


def test_the_neuron_share_link_of_a_real_profile_opens(profile, monkeypatch):
    root, manifest = profile
    monkeypatch.setenv("SAM_VIZ_PROFILE_DIR", str(root))
    at = AppTest.from_file(str(ROOT / "pages" / "corpus.py"), default_timeout=120)
    at.query_params.update(profile=manifest["id"], layer="1", neuron="3")
    at.run()
    assert not at.exception and not at.error and not at.warning
    assert at.query_params["neuron"] == "3"
