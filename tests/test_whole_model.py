"""The Whole model page and its data (issue 22, section 5): figure functions against numbers computed
by hand here, the recorded masks against the policies' rules applied by hand to the captured inputs,
and the page (AppTest) under scope all and scope mlp."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import shared
from sam_viz import RunSpec, analyze
from sam_viz import whole_model as wm
from sam_viz.figures import whole_model as figs
from test_app import PROMPT, chart_titles, open_app

X = torch.tensor([[1.0, -2.0, 3.0, 0.0],
                  [-4.0, 0.5, 0.0, 1.0],
                  [0.0, 0.0, -1.0, 2.0]])                                   # [T=3, d_in=4]
KEPT = torch.tensor([[False, True, True, False],
                     [True, False, False, True],
                     [False, False, True, True]])


def test_kept_map_cells_are_plus_abs_x_where_kept_and_minus_where_dropped():
    plot = figs.kept_map(X, KEPT, ["a", "b", "c"], 2, "q", "topk at 0.5")
    heat = plot.fig.data[0]
    assert np.array(heat.z).tolist() == [[-1, 2, 3, -0.0], [4, -0.5, -0.0, 1], [-0.0, -0.0, 1, 2]]
    assert np.array(heat.customdata).tolist() == X.tolist()
    assert list(heat.x) == [0, 1, 2, 3] and list(heat.y) == ["0: a", "1: b", "2: c"]
    assert "50% of entries kept" in plot.fig.layout.title.subtitle.text          # 6 of 12 by hand
    assert plot.note == ""


def test_kept_map_keeps_the_channels_of_largest_total_abs_x_past_the_budget():
    x = torch.full((4, 64), 0.1)
    x[:, 40] = 50.0                                                         # planted: must survive
    plot = figs.kept_map(x, x.abs() > 1, list("abcd"), 0, "o", "run", max_cells=16 * 4 * 2 + 4 + 16 + 32)
    heat = plot.fig.data[0]
    assert 40 in list(heat.x) and len(heat.x) == 16
    assert np.array(heat.z).size <= 16 * 4
    assert "16 channels of largest total |x| of 64" in plot.note


def test_massive_channels_find_the_planted_outliers():
    x = torch.ones(5, 32) * torch.tensor([1.0, -1.0]).repeat(16)            # every channel's peak |x| = 1
    x[2, 7], x[4, 19], x[0, 3] = 50.0, -30.0, 5.0
    found = wm.massive_channels(x, ratio=20, top=3)
    # the median of 32 peaks, 29 of them 1: 1, so the ratios are the peaks
    assert [(c["channel"], c["ratio"], c["massive"]) for c in found] == [(7, 50.0, True), (19, 30.0, True),
                                                                         (3, 5.0, False)]


def test_topk_mask_keep_rates_and_mass_kept_by_hand():
    mask = wm.topk_mask(X, 0.5)                                             # k = 2 of 4 per token
    assert mask.tolist() == [[False, True, True, False],                    # |x| 1 2 3 0: channels 1, 2
                             [True, False, False, True],                    # 4 .5 0 1: channels 0, 3
                             [False, False, True, True]]                    # 0 0 1 2: channels 2, 3
    assert wm.keep_rates({"topk": mask}, [2, 0])["topk"] == pytest.approx([2 / 3, 1 / 3])
    # kept |x|: 2+3 + 4+1 + 1+2 = 13 of 1+2+3+4+.5+1+1+2 = 14.5
    assert wm.mass_kept(X, mask) == pytest.approx(13 / 14.5)
    norms = torch.tensor([1.0, 0.5, 2.0, 1.0])                              # wina: |x_i| * ||W[:, i]||
    assert wm.mass_kept(X, mask, norms) == pytest.approx((1 + 6 + 4 + 1 + 2 + 2) / (1 + 1 + 6 + 4 + 0.25 + 1 + 2 + 2))


def test_allocation_grids_and_heatmap_show_the_calibrations_numbers():
    table = {("uniform", 0): {"q": 0.5, "o": 0.5}, ("uniform", 1): {"q": 0.5, "o": 0.5},
             ("greedy", 0): {"q": 0.3, "o": 0.9}, ("greedy", 1): {"q": 0.6, "o": 0.2}}
    errors = {("uniform", 0): 0.04, ("uniform", 1): 0.05, ("greedy", 0): 0.01, ("greedy", 1): 0.02}
    cal = SimpleNamespace(projections=("q", "o"), weights=torch.zeros(2, 2),
                          densities=lambda i, d, a, k: table[(a, i)],
                          block_error_at=lambda i, d, a, k: errors[(a, i)])
    grids = wm.allocation_grids(cal, 0.5, "teal")
    assert grids["density"] == {"uniform": [[0.5, 0.5], [0.5, 0.5]], "greedy": [[0.3, 0.9], [0.6, 0.2]]}
    fig = figs.allocation_heatmap(grids, 0.5, "teal").fig
    heats = [t for t in fig.data if t.type == "heatmap"]
    assert [np.array(h.z).tolist() for h in heats] == [[[0.5, 0.5], [0.5, 0.5]], [[0.3, 0.9], [0.6, 0.2]]]
    lines = {t.name: list(t.x) for t in fig.data if t.type == "scatter"}
    assert lines == {"uniform": [0.04, 0.05], "greedy": [0.01, 0.02]}


def test_quality_sweep_draws_each_series_by_whole_model_density():
    rows = [{"series": "topk", "model_density": 0.5, "value": 0.2, "metric": "kl"},
            {"series": "topk", "model_density": 0.25, "value": 0.9, "metric": "kl"},
            {"series": "MLP only: threshold", "model_density": 0.7, "value": 0.1, "metric": "kl"}]
    fig = figs.quality_sweep(rows, current=(0.5, 0.2)).fig
    assert [(t.name, list(t.x), list(t.y)) for t in fig.data] == [
        ("topk", [0.25, 0.5], [0.9, 0.2]), ("MLP only: threshold", [0.7], [0.1]), ("this run", [0.5], [0.2])]
    assert "embeddings excluded" in fig.layout.xaxis.title.text


@pytest.fixture(scope="module")
def topk_all():
    spec = RunSpec(prompt="The cat sat on the mat. It slept all day.", model="tiny-llama", policy="topk",
                   density=0.5, scope="all")
    return spec, analyze(shared("tiny-llama"), spec)


def test_recorded_masks_are_the_topk_rule_applied_by_hand_to_the_captured_inputs(topk_all):
    spec, a = topk_all
    xs = wm.layer_inputs(shared("tiny-llama"), spec, 1)
    masks = wm.recorded_masks(a, 1)
    assert set(xs) == set(masks) == {"q", "k", "v", "o", "gate", "up", "down"}
    for name, x in xs.items():
        k = round(0.5 * x.shape[1])
        order = np.argsort(-np.abs(x.numpy()), axis=1, kind="stable")[:, :k]   # ties to the lower index
        by_hand = np.zeros(x.shape, dtype=bool)
        np.put_along_axis(by_hand, order, True, axis=1)
        assert (masks[name].numpy() == by_hand).all(), name
    assert torch.equal(xs["q"], xs["k"]) and torch.equal(xs["gate"], xs["up"])   # one input each


def test_the_sweep_places_whole_model_topk_at_its_density(topk_all):
    spec, _ = topk_all
    rows, skipped = wm.whole_model_sweep(shared("tiny-llama"), spec, densities=(0.5,),
                                         series=(("topk", "topk", "all", "greedy"),
                                                 ("MLP only: topk", "topk", "mlp", "greedy")))
    assert skipped == [] and [r["series"] for r in rows] == ["topk", "MLP only: topk"]
    # every tiny-llama input width is even: exactly half of every projection's columns are read
    assert rows[0]["model_density"] == pytest.approx(0.5)
    cfg = shared("tiny-llama").model.config
    d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    attention, mlp = d * d + 2 * d * kv + d * d, 3 * d * f                  # q, k, v, o; gate, up, down
    assert rows[1]["model_density"] == pytest.approx((attention + 0.5 * mlp) / (attention + mlp))
    assert all(r["metric"] == "kl" and r["value"] >= 0 and math.isfinite(r["value"]) for r in rows)


def test_the_page_draws_its_figures_under_scope_all():
    at = open_app("whole_model", model="tiny-llama", prompt=PROMPT, scope="all", policy="topk", density="0.5")
    assert not at.exception and not at.error, at.exception
    titles = " ".join(chart_titles(at))
    for part in ("which input channels each token kept", "spread over layers and projections",
                 "largest input channels", "mass kept per projection"):
        assert part in titles
    next(b for b in at.button if b.label == "Run the whole-model sweep").click().run()
    assert not at.exception and not at.error
    assert "Output quality vs whole-model density" in chart_titles(at)


def test_the_page_under_scope_mlp_says_so_and_switches():
    at = open_app("whole_model", model="tiny-llama", prompt=PROMPT, policy="threshold", density="0.5")
    assert not at.exception and not at.error
    assert any("This run's scope is mlp" in i.value for i in at.info) and not at.get("plotly_chart")
    next(b for b in at.button if b.label == "Switch to scope all (topk)").click().run()
    assert not at.exception and not at.error
    spec = at.session_state["ctx"].spec
    assert (spec.scope, spec.policy) == ("all", "topk")
    assert any("which input channels each token kept" in t for t in chart_titles(at))
