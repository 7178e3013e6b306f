"""sam_viz.speed (forward timing: warm-up, paired rounds, median and range of the speedup; bandwidth,
per-token floors, benchmark files, dense vs its floor), the speed figures (well-formed, bounded), and
sam_viz.benchmarks.kernels' progress callback."""
import json
import math

import pytest

from conftest import shared
from sam_viz.models import InputError
from sam_viz import RunSpec, analyze, speed
from sam_viz.figures import speed as speed_figures
from sam_viz.benchmarks import kernels
from sam_viz.figures.speed import MAX_ROWS

PROMPT = "The lighthouse keeper counted ships."


def kernel_rows(shapes=(("tinyllama", "fp32"), ("tinyllama", "bf16")), densities=(0.05, 0.1, 0.25, 0.5)):
    return [{"backend": "cpu", "shape": s, "dtype": dt, "density": d, "ms": 10 * d + 1, "dense_ms": 8.0,
             "floor_ms": 10 * d, "speedup_vs_dense": 8.0 / (10 * d + 1)} for s, dt in shapes for d in densities]


def decode_rows(densities=(0.05, 0.1, 0.25, 0.5), f_mlp=0.6):
    return [{"density": d, "dense_tok_s": 20.0, "sparse_tok_s": 30.0 + d, "speedup": (30.0 + d) / 20,
             "ideal_speedup": 1 / (1 - f_mlp + f_mlp * d), "share_of_ideal": 0.9, "f_mlp": f_mlp} for d in densities]


def fake_pass(times: list[float], log: list[str], name: str):
    """A pass that returns the next of `times` as its own duration and logs that it ran."""
    it = iter(times)

    def run() -> float:
        log.append(name)
        return next(it)
    return run


def test_paired_rounds_drop_the_warm_up_and_alternate_the_order():
    """The first passes are slow (layouts, allocator): the warm-up rounds take them and are not kept."""
    log = []
    dense = fake_pass([50.0, 40.0, 10.0, 11.0, 12.0, 13.0], log, "d")
    sparse = fake_pass([900.0, 60.0, 5.0, 4.0, 6.0, 8.0], log, "s")
    pairs = speed.paired_rounds(dense, sparse, rounds=4, warmup=2)
    assert pairs == [(10.0, 5.0), (11.0, 4.0), (12.0, 6.0), (13.0, 8.0)]
    assert log == ["d", "s", "s", "d", "d", "s", "s", "d", "d", "s", "s", "d"]     # ABBA: neither always second
    assert speed.paired_rounds(fake_pass([1.0], [], "d"), fake_pass([2.0], [], "s"), rounds=1, warmup=0) == [(1.0, 2.0)]


def test_speedup_is_the_median_of_per_round_ratios_with_its_range():
    pairs = [(10.0, 5.0), (10.0, 20.0), (30.0, 10.0)]               # ratios 2, 0.5, 3 by hand
    s = speed.summarize_rounds(pairs)
    assert s["speedup"] == 2.0 and s["speedup_min"] == 0.5 and s["speedup_max"] == 3.0
    assert s["dense_ms"] == 10.0 and s["sparse_ms"] == 10.0 and s["rounds"] == 3    # a ratio of medians says 1.0
    assert speed.speedup_text({**s, "speedup": 0.954, "speedup_min": 0.876, "speedup_max": 1.018, "rounds": 7}) == \
        "0.95x (0.88-1.02 over 7 rounds)"


def test_time_forward_warms_up_then_times_paired_rounds_of_the_prompt():
    loaded = shared("tiny-llama")
    spec = RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.5, kernel="cpu")
    calls = []
    handle = loaded.model.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        t = speed.time_forward(loaded, spec, rounds=3, warmup=2)
    finally:
        handle.remove()
    assert len(calls) == 2 * (2 + 3)                                   # dense and sparse, warm-up included
    assert t["tokens"] == len(loaded.encode(PROMPT)["input_ids"][0]) and t["rounds"] == 3 and t["warmup"] == 2
    assert t["dense_ms"] > 0 and t["sparse_ms"] > 0
    assert t["speedup_min"] <= t["speedup"] <= t["speedup_max"]
    assert speed.time_forward(loaded, spec, rounds=-4, warmup=0)["rounds"] == 1


def test_dense_against_its_floor_from_kernel_rows():
    rows = [{**r, "dense_floor_ms": 4.0 if r["dtype"] == "bf16" else 8.0} for r in kernel_rows()]
    got = {(r["shape"], r["dtype"]): r["dense_over_floor"] for r in speed.dense_vs_floor(rows)}
    assert got == {("tinyllama", "fp32"): pytest.approx(8.0 / 8.0), ("tinyllama", "bf16"): pytest.approx(8.0 / 4.0)}
    assert speed.dense_vs_floor(kernel_rows()) == []                    # older files: no dense floor, no claim
    assert speed.dense_vs_floor([{**rows[0], "dense_floor_ms": 0}]) == []


def test_bandwidth_is_a_plausible_number():
    gb_s = speed.read_bandwidth_gb_s(nbytes=64 * 2**20, repeats=3)
    assert 0.1 < gb_s < 10_000


def test_cost_summary_is_bytes_over_bandwidth():
    spec = RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.5)
    a = analyze(shared("tiny-llama"), spec)
    s = speed.cost_summary(a, 2.0)
    d, d_ff, layers = 64, 128, 2
    dense = layers * 3 * d * d_ff * 4                # gate, up and down rows of every neuron, fp32
    sparse = layers * (2 * d * d_ff + d * d_ff // 2) * 4   # topk: gate and up of all (to rank), down of k
    assert s["dense_bytes"] == dense and s["sparse_bytes"] == pytest.approx(sparse)
    assert s["dense_floor_ms"] == pytest.approx(dense / 2e9 * 1e3)
    assert s["sparse_floor_ms"] == pytest.approx(sparse / 2e9 * 1e3)
    assert s["floor_speedup"] == pytest.approx(dense / sparse)
    assert speed.cost_summary(a, 0.0) is None


def test_bench_files_round_trip_and_bad_ones_get_one_sentence():
    rows = kernel_rows()
    assert speed.parse_bench_json(json.dumps(rows)) == ("kernels", rows)
    assert speed.parse_bench_json(json.dumps(decode_rows()).encode())[0] == "decode"
    bad = ["not json", "{}", "[]", "[1, 2]", json.dumps([{"density": 0.5}]),
           json.dumps([{**rows[0], "ms": "fast"}]), json.dumps([{**rows[0], "density": 3}]),
           json.dumps([{**rows[0], "ms": -1}]), json.dumps([{**rows[0], "ms": True}]),
           json.dumps([{**rows[0], "ms": float("nan")}]), json.dumps(kernel_rows() * 100),
           "[" + " " * (3 * 2**20) + "]", b"\xff\xfe"]
    for text in bad:
        with pytest.raises(InputError) as err:
            speed.parse_bench_json(text)
        assert len(str(err.value).splitlines()) == 1


def test_parsed_labels_are_bounded():
    rows = [{**r, "shape": "<b>" + "x" * 500} for r in kernel_rows()]
    _, parsed = speed.parse_bench_json(json.dumps(rows))
    assert all(len(r["shape"]) <= 40 for r in parsed)


def values(fig) -> int:
    n = 0
    for t in fig.data:
        for key in ("x", "y", "customdata"):
            v = getattr(t, key, None)
            n += len(v) if v is not None else 0
    return n


def test_forward_bars():
    timing = {"dense_ms": 5.0, "sparse_ms": 4.0, "speedup": 1.25, "tokens": 7, "repeats": 3}
    summary = {"dense_floor_ms": 0.2, "sparse_floor_ms": 0.05}
    plot = speed_figures.forward_bars(timing, summary)
    assert [list(t.y) for t in plot.fig.data] == [[5.0, 4.0], [0.2, 0.05]] and plot.note == ""
    assert len(speed_figures.forward_bars(timing, None).fig.data) == 1


def test_kernel_figures():
    rows = kernel_rows()
    ms = speed_figures.kernel_ms(rows)
    assert len(ms.fig.data) == 2 * 3                                     # 2 panels x dense / cpu / floor
    cpu = [t for t in ms.fig.data if t.name == "cpu kernel"][0]
    assert list(cpu.x) == [0.05, 0.1, 0.25, 0.5] and list(cpu.y) == pytest.approx([1.5, 2, 3.5, 6])
    sp = speed_figures.kernel_speedup(rows)
    ideal = [t for t in sp.fig.data if t.name == "ideal 1/density"][0]
    assert list(ideal.y) == pytest.approx([20, 10, 4, 2])
    assert "No kernel benchmark" in speed_figures.kernel_ms([]).note


def test_decode_figure_draws_the_amdahl_ideal():
    plot = speed_figures.decode_tokens(decode_rows())
    ideal = [t for t in plot.fig.data if t.name.startswith("ideal")][0]
    assert list(ideal.y) == pytest.approx([20 / (0.4 + 0.6 * d) for d in (0.05, 0.1, 0.25, 0.5)])
    assert "60%" in plot.fig.layout.title.text
    assert "No decode benchmark" in speed_figures.decode_tokens([]).note


def test_figures_are_bounded():
    many = kernel_rows(shapes=[(f"s{i}", "fp32") for i in range(40)], densities=[0.01 * i for i in range(1, 51)])
    for fn in (speed_figures.kernel_ms, speed_figures.kernel_speedup):
        plot = fn(many)
        assert values(plot.fig) <= 8 * MAX_ROWS and plot.note
    plot = speed_figures.decode_tokens(decode_rows(densities=[i / 5000 for i in range(1, 5001)]))
    assert values(plot.fig) <= 3 * 2 * MAX_ROWS and str(MAX_ROWS) in plot.note


def test_kernel_bench_reports_progress(monkeypatch):
    monkeypatch.setattr(kernels, "ROTATE_BYTES", 2**16)
    seen = []
    rows = kernels.run(shapes={"toy": (32, 64)}, dtypes=("fp32", "bf16"), densities=(0.5,), calls=2,
                       progress=lambda f, t: seen.append(f))
    assert seen == [0.0, 0.5, 1.0]
    assert [(r["shape"], r["dtype"], r["density"]) for r in rows] == [("toy", "fp32", 0.5), ("toy", "bf16", 0.5)]
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in rows)


def test_saved_gpu_results_become_kernel_rows(tmp_path):
    """The triton rows saved from the GPU: speedups recomputed from the graph-replay times, bad rows
    skipped, a missing or broken file gives nothing."""
    import json

    from sam_viz import speed

    raw = {"info": {"device": "GPU X"}, "rows": [
        {"shape": "s", "dtype": "bf16", "density": 0.1, "graph_ms": 0.02, "dense_graph_ms": 0.08, "floor_ms": 0.005},
        {"shape": "s", "dtype": "bf16", "density": 0.5, "graph_ms": 0.0, "dense_graph_ms": 0.08, "floor_ms": 0.01},
        {"shape": "s", "dtype": "bf16", "density": 0.25}]}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(raw))
    info, rows = speed.saved_gpu_rows(f)
    assert info == {"device": "GPU X"} and len(rows) == 1
    assert rows[0]["speedup_vs_dense"] == pytest.approx(0.08 / 0.02)
    f.write_text("not json")
    assert speed.saved_gpu_rows(f) == ({}, [])
    assert speed.saved_gpu_rows(tmp_path / "missing.json") == ({}, [])
    assert len(speed.saved_gpu_rows()[1]) == 24                      # the committed H200 results


def test_the_note_on_passing_one_over_density_names_the_dense_floor_ratios():
    rows = [{**r, "dense_floor_ms": 4.0 if r["dtype"] == "bf16" else 6.4} for r in kernel_rows()]
    note = speed.beyond_ideal_note(rows)
    assert "1/density" in note and "bf16" in note
    assert "1.25x its floor (tinyllama fp32)" in note and "2.00x its floor (tinyllama bf16)" in note   # 8/6.4, 8/4
    assert "not known" in speed.beyond_ideal_note(kernel_rows())


@pytest.mark.parametrize("speedup,moved", [(0.46, 1), (0.994, 1), (0.996, 0), (1.004, 0), (1.3, -1)])
def test_time_change_is_the_sign_of_the_measured_change_at_two_decimals(speedup, moved):
    assert speed.time_change({"speedup": speedup}) == moved          # +1: sparse took longer than dense
