"""The read side of corpus profiles (sam_viz.profile.view) on profiles written by hand here, per the
on-disk contract, with numbers chosen so that every view is known by hand: hot-neuron curves, dead
and always-on counts, phi of two units, the downsampled firing matrix, and id checks that keep every
read inside the root."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from sam_viz.models.errors import InputError
from sam_viz.profile import list_profiles, open_profile
from sam_viz.profile.view import context_pieces, context_prompt, marked_pieces

PID = "0123456789ab"
EDGES = [-1.0, 0.0, 1.0, 2.0]          # 5 bins: (-inf,-1) [-1,0) [0,1) [1,2) [2,inf)
TOKENS = 10                            # tokens per layer; density 0.25 of 8 units: 2 selections per token
# Which tokens each unit fires on (oracle top-2 of 8 on every token).
FIRES = {
    0: {0: range(10), 1: range(6), 2: range(6, 10)},
    1: {0: range(0, 3), 1: range(0, 3), 2: range(3, 6), 3: range(3, 6),
        4: (6, 7), 5: (6, 7), 6: (8, 9), 7: (8, 9), },
}
TRICKY = ["The", "␣shirt", "␣costs", "␣$", "20", "␣*", "bold", "*", "␣<", "b", ">", "␣and"]


def _neurons(n_layers=2, units=8, fires=FIRES):
    rows = []
    for layer in range(n_layers):
        for j in range(units):
            count = len(fires.get(layer, {}).get(j, ()))
            rows.append(dict(layer=layer, neuron=j, tokens=TOKENS, fire_count=count, select_count=max(0, count - 1),
                             sum_abs=2.5 * count, max_abs=float(count), hist=[0, 0, TOKENS - count, count, 0]))
    return pd.DataFrame(rows).astype({"layer": "int32", "neuron": "int32"})


def _cofire():
    rows = []
    for layer, fires in FIRES.items():
        units = sorted(fires) if layer == 1 else [0, 1, 2]     # layer 0: only its 3 live units sampled
        for a in units:
            for b in units:
                if a < b:
                    rows.append(dict(layer=layer, a=a, b=b, both=len(set(fires[a]) & set(fires[b])), tokens=TOKENS))
    return pd.DataFrame(rows)


def _examples():
    rows = [dict(layer=0, neuron=0, band="top", rank=r, value=3.0 - r, doc=r, pos=3, tokens=TRICKY, focus=3)
            for r in range(3)]
    rows += [dict(layer=0, neuron=0, band=f"q{q}", rank=0, value=0.1 * q, doc=9, pos=q,
                  tokens=["a", "␣b", "␣c"], focus=1) for q in range(5)]
    return pd.DataFrame(rows).astype({"rank": "int32", "focus": "int32"})


def _logits():
    rows = [dict(layer=0, neuron=0, sign=sign, rank=r, token_id=r, token=f"{sign[0]}{r}<$>",
                 value=(1 if sign == "boost" else -1) * (3 - r)) for sign in ("boost", "suppress") for r in range(3)]
    return pd.DataFrame(rows).astype({"rank": "int32"})


def write_profile(root, pid=PID, *, created="2026-11-30T12:00:00+00:00", model="tiny-llama", n_layers=2, units=8,
                  neurons=None, kind="causal-lm"):
    """A complete profile under root/pid, as build_profile writes one (schema version 1)."""
    path = root / pid
    path.mkdir(parents=True)
    manifest = {
        "version": 1, "id": pid, "created": created, "model": model, "model_fingerprint": "f" * 16,
        "model_type": "llama", "kind": kind, "n_layers": n_layers, "d_ff": units, "n_experts": 0, "units": units,
        "corpus": {"source": "builtin:calibration", "hash": "0" * 16, "documents": 3, "text_column": None},
        "settings": {"policy": "threshold", "density": 0.25, "context": 16, "max_tokens": None, "kernel": "reference"},
        "tokens": TOKENS * n_layers, "engine": "local", "workers": 1, "wall_s": 1.5, "hist_edges": EDGES,
        "top_n": 20, "context_radius": 8, "quantile_bands": [[i / 5, (i + 1) / 5] for i in range(5)],
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    (neurons if neurons is not None else _neurons(n_layers, units)).to_parquet(path / "neurons.parquet")
    pd.DataFrame({"layer": range(n_layers), "tokens": TOKENS, "density": 0.3, "oracle_density": 0.25,
                  "mass_kept": 0.8, "recall": [0.9 - 0.1 * i for i in range(n_layers)], "precision": 0.75,
                  "dead": 0, "always_on": 0, "router_entropy": None}).to_parquet(path / "layers.parquet")
    _examples().to_parquet(path / "examples.parquet")
    if n_layers == 2 and units == 8:
        _cofire().to_parquet(path / "cofire.parquet")
    if kind == "causal-lm":
        _logits().to_parquet(path / "logits.parquet")
    return path


@pytest.fixture
def root(tmp_path):
    write_profile(tmp_path)
    return tmp_path


def test_listing_is_newest_first_and_skips_what_is_not_a_complete_profile(tmp_path, monkeypatch):
    write_profile(tmp_path, "aaaaaaaaaaaa", created="2026-01-01T00:00:00+00:00")
    write_profile(tmp_path, "bbbbbbbbbbbb", created="2026-06-01T00:00:00+00:00")
    (tmp_path / ".cccccccccccc.partial").mkdir()                      # being written
    (tmp_path / "dddddddddddd").mkdir()                               # no manifest
    (tmp_path / "eeeeeeeeeeee").mkdir()
    (tmp_path / "eeeeeeeeeeee" / "manifest.json").write_text("{not json")
    monkeypatch.setenv("SAM_VIZ_PROFILE_DIR", str(tmp_path))
    assert [m["id"] for m in list_profiles()] == ["bbbbbbbbbbbb", "aaaaaaaaaaaa"]
    assert list_profiles(tmp_path / "nowhere") == []


def test_hot_curve_per_layer_and_model_wide(root):
    p = open_profile(PID, root)
    # layer 0 fire counts 10, 6, 4, then five zeros: 20 selections
    c = p.hot_curve(0)
    assert np.allclose(c.units, np.arange(9) / 8)
    assert np.allclose(c.selections, [0, 10 / 20, 16 / 20, 1, 1, 1, 1, 1, 1])
    assert c.covering(0.8) == 2 / 8 and c.covering(0.5) == 1 / 8 and c.covering(1.0) == 3 / 8
    # model-wide: 16 units, counts 10 6 4 3 3 3 3 2 2 2 2 0 0 0 0 0 (40): 32 = 80% after 7 units
    m = p.hot_curve()
    assert len(m.units) == 17
    assert np.allclose(m.selections[:4], [0, 10 / 40, 16 / 40, 20 / 40])
    assert m.covering(0.8) == 7 / 16
    with pytest.raises(InputError, match="Layer 2 is out of range"):
        p.hot_curve(2)


def test_dead_and_always_on_counts_and_layer_recall(root):
    t = open_profile(PID, root).layer_table()
    assert t["dead"].tolist() == [5, 0]                 # layer 0: units 3..7 never fire
    assert t["always_on"].tolist() == [1, 0]            # layer 0: unit 0 fires on all 10 tokens
    assert t["recall"].tolist() == pytest.approx([0.9, 0.8])


def test_phi_of_two_units_and_the_units_outside_the_sample(root):
    p = open_profile(PID, root)
    v = p.neuron(1, 0)
    by_unit = dict(zip(v.correlated["unit"], v.correlated["phi"]))
    # units 0 and 1 fire on the same 3 of 10 tokens: phi = (0.3 - 0.09) / (0.3 * 0.7) = 1
    assert by_unit[1] == pytest.approx(1.0)
    # units 0 and 2 never together: (0 - 0.09) / 0.21 = -3/7; units 0 and 4: -0.06 / sqrt(0.21 * 0.16)
    assert by_unit[2] == pytest.approx(-3 / 7)
    assert by_unit[4] == pytest.approx(-0.06 / math.sqrt(0.21 * 0.16))
    assert v.correlated["unit"].iloc[0] == 1 and len(v.correlated) == 7
    # layer 0: unit 0 fires on every token (no phi); units 1 and 2 never together: phi = -1
    w = p.neuron(0, 1)
    assert dict(zip(w.correlated["unit"], w.correlated["phi"])) == {2: pytest.approx(-1.0)}
    outside = p.neuron(0, 5)
    assert outside.correlated is None and "not among" in outside.cofire_note


def test_neuron_view_counts_histogram_examples_and_logits(root):
    v = open_profile(PID, root).neuron(0, 1)
    assert (v.tokens, v.fire_count, v.select_count) == (10, 6, 5)
    assert v.fire_freq == 0.6 and v.select_freq == 0.5
    assert v.mean_abs == pytest.approx(2.5 * 6 / 10) and v.max_abs == 6.0
    assert v.hist == [0, 0, 4, 6, 0] and v.hist_edges == EDGES
    top = open_profile(PID, root).neuron(0, 0)
    assert top.band("top")["value"].tolist() == [3.0, 2.0, 1.0]
    assert [top.band(f"q{q}")["value"].iloc[0] for q in range(5)] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert top.logits[top.logits["sign"] == "boost"]["value"].tolist() == [3, 2, 1]
    with pytest.raises(InputError, match="Neuron 8 is out of range"):
        open_profile(PID, root).neuron(0, 8)


def test_firing_matrix_is_sorted_and_downsampled_to_block_means(tmp_path):
    # 3 layers x 1024 units; unit j of layer l fires on (j + l) % 1024 of 1024 tokens
    units = 1024
    rows = pd.DataFrame([dict(layer=l, neuron=j, tokens=units, fire_count=(j + l) % units, select_count=0, sum_abs=0.0,
                              max_abs=0.0, hist=[0] * 5) for l in range(3) for j in range(units)])
    write_profile(tmp_path, n_layers=3, units=units, neurons=rows)
    m = open_profile(PID, tmp_path).firing_matrix(max_columns=512)
    assert m.values.shape == (3, 512) and m.block == 2
    # sorted descending, frequencies 1023/1024, 1022/1024, ...: block i is the mean of 1023-2i and 1022-2i
    assert np.allclose(m.values[0], [(1022.5 - 2 * i) / 1024 for i in range(512)])
    assert np.allclose(m.values[2], m.values[0])       # the same counts, permuted
    assert open_profile(PID, tmp_path).firing_matrix(max_columns=300).values.shape == (3, 256)  # blocks of ceil(1024/300) = 4


@pytest.mark.parametrize("bad", ["../x", "/etc", "..", "", "0123456789AB", "0123456789ab\n", "0123456789a",
                                 "0123456789ab/..", "%2e%2e%2fetc", "fffffffffffff"])
def test_bad_ids_are_one_sentence_and_build_no_path(root, bad):
    with pytest.raises(InputError) as exc:
        open_profile(bad, root)
    assert "is not a profile id" in str(exc.value) and str(exc.value).count(". ") == 0


def test_unknown_id_and_a_link_leading_out_of_the_root(tmp_path):
    outside, root = tmp_path / "outside", tmp_path / "root"
    write_profile(outside, "abcdefabcdef")
    root.mkdir()
    os.symlink(outside / "abcdefabcdef", root / "abcdefabcdef")
    with pytest.raises(InputError, match="There is no profile with id 'abcdefabcdef'"):
        open_profile("abcdefabcdef", root)
    assert list_profiles(root) == []
    with pytest.raises(InputError, match="no profile with id '111111111111'"):
        open_profile("111111111111", root)


def test_a_table_leading_out_of_the_profile_or_damaged_is_one_sentence(root, tmp_path):
    os.remove(root / PID / "neurons.parquet")
    os.symlink(tmp_path / "elsewhere.parquet", root / PID / "neurons.parquet")
    _neurons().to_parquet(tmp_path / "elsewhere.parquet")
    with pytest.raises(InputError, match="neurons.parquet is damaged .it leads out"):
        open_profile(PID, root).hot_curve()
    os.remove(root / PID / "neurons.parquet")
    _neurons().to_parquet(root / PID / "neurons.parquet")
    (root / PID / "layers.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="layers.parquet is damaged"):
        open_profile(PID, root).layer_table()


def test_contexts_become_text_and_prompts():
    assert "".join(context_pieces(TRICKY)) == "The shirt costs $20 *bold* <b> and"
    assert context_pieces(["the", "cat", "##s", "[SEP]"]) == ["the", " cat", "s", " [SEP]"]
    assert context_prompt(["[CLS]", "the", "cat", "##s", "sat"], 3) == ("the cats sat", 2)
    assert context_prompt(["a", "↵", "␣b"], 2) == ("a\n b", 2)
    assert marked_pieces(["the", "cat", "##s"], 1) == (["the", " ", "cat", "s"], 2)     # the space is not marked
    assert marked_pieces(["the", "cat", "##s"], 2) == (["the", " cat", "s"], 2)


def test_figures_bound_what_they_send_and_say_so(tmp_path):
    from sam_viz.figures import corpus as corpus_figures

    units = 1024
    rows = pd.DataFrame([dict(layer=l, neuron=j, tokens=units, fire_count=j, select_count=0, sum_abs=0.0, max_abs=0.0,
                              hist=[0] * 5) for l in range(3) for j in range(units)])
    write_profile(tmp_path, n_layers=3, units=units, neurons=rows)
    p = open_profile(PID, tmp_path)
    hot = corpus_figures.hot_curves(p, max_points=100)
    lines = [t for t in hot.fig.data if t.name != "every neuron alike"]
    assert len(lines) == 4 and all(len(t.x) <= 100 for t in lines) and "at most 100" in hot.note
    assert all(t.x[0] == 0 and t.x[-1] == 1 and t.y[-1] == 1 for t in lines)     # ends kept
    heat = corpus_figures.firing_heatmap(p)
    assert np.asarray(heat.fig.data[0].z).shape == (3, 512) and "mean of 2 neighbouring ranks" in heat.note


def test_histogram_bars_sit_on_the_profile_bins_and_logits_are_ordered(root):
    from sam_viz.figures import corpus as corpus_figures

    v = open_profile(PID, root).neuron(0, 0)
    bar = corpus_figures.neuron_histogram(v).fig.data[0]
    # edges -1 0 1 2 (width 1): open bins drawn as [-2, -1) and [2, 3)
    assert list(bar.x) == [-1.5, -0.5, 0.5, 1.5, 2.5] and list(bar.y) == [0, 0, 0, 10, 0]
    assert bar.customdata[0] == "< -1" and bar.customdata[-1] == "≥ 2"
    logit = corpus_figures.logit_effects(v).fig.data[0]
    assert list(logit.x) == [3, 2, 1, -1, -2, -3]
    assert logit.y[0] == "+1 b0&lt;$&gt;"                      # plotly reads labels as HTML: escaped


def test_a_unit_that_fires_on_every_token_has_no_phi_and_says_why(root):
    v = open_profile(PID, root).neuron(0, 0)                 # fires on all 10 tokens of layer 0
    assert v.correlated.empty and "phi is undefined" in v.cofire_note


@pytest.mark.parametrize("change", [dict(units=0), dict(n_layers="2"), dict(settings={"policy": "topk"}), dict(kind=None)])
def test_a_damaged_manifest_is_one_sentence_and_not_listed(root, change):
    file = root / PID / "manifest.json"
    manifest = {k: v for k, v in json.loads(file.read_text()).items() if k not in change or change[k] is not None}
    file.write_text(json.dumps({**manifest, **{k: v for k, v in change.items() if v is not None}}))
    with pytest.raises(InputError, match=f"Profile '{PID}' cannot be read: its manifest.json is damaged"):
        open_profile(PID, root)
    assert list_profiles(root) == []


def test_moe_units_count_their_expert_s_tokens(tmp_path):
    """2 experts x 4 neurons: expert 0 saw 10 tokens, expert 1 saw 4; unit 5 (expert 1, neuron 1)
    fired on all 4 of its tokens: always on, frequency 1, though it fired on 4 of the layer's 10."""
    fires = {0: {0: range(10), 1: range(6), 5: range(4)}}
    rows = _neurons(n_layers=1, units=8, fires=fires)
    rows.loc[rows["neuron"] >= 4, "tokens"] = 4
    write_profile(tmp_path, n_layers=1, units=8, neurons=rows)
    file = tmp_path / PID / "manifest.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "d_ff": 4, "n_experts": 2}))
    p = open_profile(PID, tmp_path)
    v = p.neuron(0, 5)
    assert (v.expert, v.tokens, v.fire_freq) == (1, 4, 1.0)
    assert p.layer_table()["always_on"].tolist() == [2] and p.layer_table()["dead"].tolist() == [5]
    assert np.allclose(p.frequency()[0, :6], [1, 0.6, 0, 0, 0, 1])


def _with_manifest(path, **change):
    file = path / "manifest.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **change}))


def test_histogram_axis_spans_the_bins_that_hold_data_not_the_fixed_range(tmp_path):
    """The profile's real bins (0 and ±2^j up to ±128); a neuron whose |h| stays at or below 2.25 is
    drawn on an axis around its data's bins [-4, -2) .. [2, 4), not on ±128 and the open bins."""
    from sam_viz.figures import corpus as corpus_figures
    from sam_viz.profile.stats import HIST_EDGES

    h = np.array([-2.25, -0.3, 0.1, 0.7, 1.5, 2.25])
    counts = np.bincount(np.searchsorted(HIST_EDGES, h, side="right"), minlength=len(HIST_EDGES) + 1)
    rows = _neurons().assign(hist=[counts.tolist()] * 16, max_abs=2.25)
    _with_manifest(write_profile(tmp_path, neurons=rows), hist_edges=list(HIST_EDGES))
    fig = corpus_figures.neuron_histogram(open_profile(PID, tmp_path).neuron(0, 0)).fig
    assert fig.layout.xaxis.range is not None                        # not autoranged over every bin
    left, right = fig.layout.xaxis.range
    assert -4 * 1.2 <= left <= -4 and 4 <= right <= 4 * 1.2         # the data's outer bins, and a margin
    assert sum(fig.data[0].y) == len(h)                              # every count still drawn


def test_under_topk_recall_and_precision_are_said_to_be_1_not_drawn(tmp_path):
    from sam_viz.figures import corpus as corpus_figures

    path = write_profile(tmp_path)
    plot = corpus_figures.layer_quality(open_profile(PID, tmp_path))
    assert [t.name for t in plot.fig.data] == ["recall", "precision", "mass kept"] and plot.note == ""
    _with_manifest(path, settings={"policy": "topk", "density": 0.25})
    plot = corpus_figures.layer_quality(open_profile(PID, tmp_path))
    assert [t.name for t in plot.fig.data] == ["mass kept"]
    assert "topk" in plot.note and "1 by construction" in plot.note


def test_firing_heatmap_colours_span_the_data_and_say_so(tmp_path):
    """Every unit fires on 2 to 5 of its 10 tokens: the colour scale is 20% to 50%, not 0 to 100%."""
    from sam_viz.figures import corpus as corpus_figures

    rows = _neurons().assign(fire_count=[2 + j % 4 for j in range(16)])
    write_profile(tmp_path, neurons=rows)
    plot = corpus_figures.firing_heatmap(open_profile(PID, tmp_path))
    heat = plot.fig.data[0]
    assert (heat.zmin, heat.zmax) == pytest.approx((0.2, 0.5))
    assert "20.0% to 50.0%" in plot.note and "not 0 to 100%" in plot.note


def test_context_pieces_read_todays_marks_and_those_of_older_profiles():
    assert context_prompt(["a", "¶", "·b", "→c"], 2) == ("a\n b\tc", 2)
    assert context_prompt(["a", "↵", "␣b", "⇥c"], 2) == ("a\n b\tc", 2)
