"""AppTest of what the pages do with the figures and numbers: cost metrics whose arrow points the way
the cost moved (down and green for less than dense; grey where the Speed page measured the sparse run
slower, which is marked up in red), the modebar shown on hover only, and the density
sweep marking the run's own density."""
import json

import pytest
from streamlit.proto.Metric_pb2 import Metric as MetricProto

from test_app import PROMPT, charts, open_app, run_db  # noqa: F401  (run_db: autouse fixture)

COSTS = {"MLP weights read per token": ("sparse_bytes", "dense_bytes"),
         "MLP FLOPs per token": ("sparse_flops", "dense_flops")}
WHAT = {"MLP weights read per token": "bytes", "MLP FLOPs per token": "FLOPs"}      # named in the delta


def cost_metrics(at) -> dict[str, MetricProto]:
    return {m.proto.label: m.proto for m in at.metric if m.proto.label in COSTS}


def timing(dense_ms: float, sparse_ms: float) -> dict:
    """A forward timing as sam_viz.speed.time_forward returns it, every round alike."""
    return {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
            "speedup_min": dense_ms / sparse_ms, "speedup_max": dense_ms / sparse_ms, "rounds": 7, "tokens": 14,
            "warmup": 2}


@pytest.fixture
def measured(monkeypatch):
    """Set the Speed page's measured forward times (no timing in tests: the machine is shared)."""
    import sam_viz.speed

    def use(dense_ms: float, sparse_ms: float) -> None:
        monkeypatch.setattr(sam_viz.speed, "time_forward", lambda *a, **k: timing(dense_ms, sparse_ms))
    return use


@pytest.mark.parametrize("page", ["compare", "speed"])
def test_a_cost_below_dense_points_down_in_green(page, measured):
    measured(10.0, 8.0)                                             # the Speed page: sparse measured faster
    at = open_app(page, model="tiny-llama", prompt=PROMPT, policy="threshold", density="0.3")
    assert not at.exception and not at.error
    cost = at.session_state["ctx"].analysis.cost
    shown = cost_metrics(at)
    assert set(shown) == set(COSTS)
    for label, (sparse, dense) in COSTS.items():
        assert cost[sparse] < cost[dense]                                   # threshold at 0.3 reads less
        m = shown[label]
        assert m.direction == MetricProto.MetricDirection.DOWN, label
        assert m.color == MetricProto.MetricColor.GREEN, label
        assert m.delta.startswith(f"{round(100 * (cost[sparse] / cost[dense] - 1))}% {WHAT[label]} vs dense"), m.delta


def test_a_sparse_run_measured_slower_gets_no_green_arrow(measured):
    """17.4 ms sparse against 8.0 dense (0.46x): the sparse forward is marked up in red, and the
    counted costs that fell (bytes, FLOPs, floor) keep their down arrows, grey, named as counts."""
    measured(8.0, 17.4)
    at = open_app("speed", model="tiny-llama", prompt=PROMPT, policy="threshold", density="0.3")
    assert not at.exception and not at.error
    metrics = {m.proto.label: m.proto for m in at.metric}
    assert not [label for label, m in metrics.items() if m.color == MetricProto.MetricColor.GREEN]
    forward = next(m for label, m in metrics.items() if label.startswith("Sparse forward"))
    assert forward.direction == MetricProto.MetricDirection.UP and forward.color == MetricProto.MetricColor.RED
    assert forward.delta.startswith("0.46x")
    for label in (*COSTS, "Floor per token (read once)"):
        m = metrics[label]
        assert m.direction == MetricProto.MetricDirection.DOWN and m.color == MetricProto.MetricColor.GRAY, label
    assert [metrics[label].delta.split(" vs ")[0].split()[-1] for label in COSTS] == ["bytes", "FLOPs"]
    assert any("measured slower than dense" in c.value for c in at.caption)


def test_a_cost_equal_to_dense_has_no_arrow():
    at = open_app("compare", model="tiny-llama", prompt=PROMPT, policy="dense")
    assert not at.exception and not at.error
    for label, m in cost_metrics(at).items():
        assert m.direction == MetricProto.MetricDirection.NONE and m.color == MetricProto.MetricColor.GRAY, label
        assert m.delta.startswith(f"same {WHAT[label]} as dense"), m.delta


def test_modebar_shows_on_hover_only():
    at = open_app("compare", model="tiny-llama", prompt=PROMPT)
    assert not at.exception
    configs = [json.loads(el.proto.config) for el in at.get("plotly_chart")]
    assert configs and all(c.get("displayModeBar") == "hover" for c in configs)


def test_sweep_marks_the_runs_density():
    at = open_app("density", model="tiny-llama", prompt=PROMPT, density="0.35")
    next(b for b in at.button if b.label == "Run the sweep").click().run()
    assert not at.exception
    sweep = next(c for c in charts(at) if c["layout"]["title"]["text"] == "Output quality vs density")
    lines = [(s["x0"], s["x1"]) for s in sweep["layout"]["shapes"] if s["type"] == "line"]
    assert lines == [(0.35, 0.35)]
    assert any("0.35" in a["text"] for a in sweep["layout"]["annotations"])


def test_dense_vs_sparse_names_its_numbers_and_words_the_cost_for_the_model():
    """Human names with a tooltip and formats (top-1 agreement as a percentage: 13 of 14 positions is
    92.9%, not 0.9286); no 'of which the predictor' for a policy without one; the cost sentence of a
    decoder, and of an encoder (minilm) one that does not describe a decoder."""
    at = open_app("compare", model="tiny-llama", prompt=PROMPT, policy="topk", density="0.3")
    assert not at.exception and not at.error
    compare = at.session_state["ctx"].analysis.compare
    shown = {m.proto.label: m.proto for m in at.metric}
    assert {"KL divergence", "Top-1 agreement", "Largest hidden-state difference"} <= set(shown)
    assert shown["Top-1 agreement"].body == f"{100 * compare['top1_agreement']:.1f}%"
    assert shown["KL divergence"].body.endswith(" nats")
    assert all(shown[k].help for k in ("KL divergence", "Top-1 agreement", "Largest hidden-state difference"))
    assert "of which the predictor" not in shown
    captions = " ".join(c.value for c in at.caption)
    assert "batch-1 decoder" in captions and "predictor" not in captions

    at = open_app("compare", model="minilm", prompt=PROMPT, policy="topk", density="0.3")
    assert not at.exception and not at.error
    shown = {m.proto.label: m.proto for m in at.metric}
    assert "Embedding cosine" in shown and "cosine" not in shown
    captions = " ".join(c.value for c in at.caption)
    assert "encoder" in captions and "decoder" not in captions


def test_a_figure_without_data_says_why_once():
    """An empty figure (the run kept no activations, a profile without logit effects) is its sentence,
    once: the page used to draw the figure, whose middle says it, and the same sentence below it."""
    from streamlit.testing.v1 import AppTest

    def page():
        from pages._shared import show
        from sam_viz.figures.firing import NO_ACTIVATIONS, _empty
        show(_empty(NO_ACTIVATIONS), key="empty")

    at = AppTest.from_function(page, default_timeout=60).run()
    assert not at.exception
    from sam_viz.figures.firing import NO_ACTIVATIONS
    said = [e.value for e in (*at.info, *at.caption, *at.markdown)]
    assert sum(NO_ACTIVATIONS[:40] in text for text in said) == 1, said
    assert not charts(at)


@pytest.mark.parametrize("model,words", [("tiny-bert", "this encoder runs all its tokens in one pass"),
                                         ("tiny-llama", "as a batch-1 decoder pays them")])
def test_the_speed_pages_explainer_counts_costs_as_the_models_kind_pays_them(model, words):
    """On an encoder the Speed page said its bytes and FLOPs were counted "as a decoder pays them"."""
    at = open_app("speed", model=model, prompt=PROMPT)
    assert not at.exception
    text = " ".join(e.proto.body for e in at.expander[0].markdown) if at.expander else ""
    text = text or " ".join(m.value for m in at.markdown)
    assert words in " ".join(text.split())
    other = "as a batch-1 decoder pays them" if model == "tiny-bert" else "this encoder"
    assert other not in " ".join(text.split())
