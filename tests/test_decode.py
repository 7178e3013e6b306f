"""sam_viz.benchmarks.decode at test size: the greedy loop against transformers' own generate, the sparse
decode path (static policy, cpu and reference kernels) against a pruned copy of the model run as
shipped, the bench's static calibration against counts made by hand, and the row math."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from sam_viz import cli
from sam_viz.benchmarks import decode
from sam_viz.sparse_ops import GRID, Policy, SparseMLP, sparsified
from sam_viz.sparse_ops.calibration import static_calibration

CFG = decode.TEST
N_NEW = 10


@pytest.fixture(scope="module")
def bench():
    loaded = decode.build_model(CFG)
    return loaded, static_calibration(loaded, decode.calibration_ids(CFG)), decode.prompt_ids(CFG)


def mlps(model) -> list[SparseMLP]:
    return [m for m in model.modules() if isinstance(m, SparseMLP)]


def test_greedy_loop_picks_what_generate_picks(bench):
    loaded, _, ids = bench
    tokens, times = decode.greedy(loaded.model, ids, N_NEW)
    config = GenerationConfig(do_sample=False, max_new_tokens=N_NEW + 1, pad_token_id=0)
    ref = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    assert tokens == ref[0, ids.shape[1]:].tolist()
    assert len(times) == N_NEW and all(t > 0 for t in times)


def test_sparse_decode_at_density_one_is_the_dense_decode(bench):
    loaded, cal, ids = bench
    dense = decode.greedy(loaded.model, ids, N_NEW)[0]
    with sparsified(loaded, Policy("static", 1.0), kernel="cpu", calibration=cal):
        assert decode.greedy(loaded.model, ids, N_NEW)[0] == dense


def _by_hand_static_ids(counts_row: torch.Tensor, k: int) -> list[int]:
    """The k most counted neurons, ties to the lower index."""
    c = counts_row.tolist()
    return sorted(range(len(c)), key=lambda j: (-c[j], j))[:k]


def _pruned(loaded, cal, density: float):
    """A copy whose MLPs keep only the static set's rows (others zeroed), run as shipped."""
    model = copy.deepcopy(loaded.model)
    for i, m in enumerate(mlps(model)):
        d_ff = m.dense.gate_proj.weight.shape[0]
        keep = _by_hand_static_ids(cal.counts[(i, -1)][GRID.index(density)], round(density * d_ff))
        drop = torch.ones(d_ff, dtype=torch.bool)
        drop[keep] = False
        m.dense.gate_proj.weight[drop] = 0
        m.dense.up_proj.weight[drop] = 0
        m.dense.down_proj.weight[:, drop] = 0
    return model


def _decode_logits(model, ids, n_new) -> tuple[list[int], torch.Tensor]:
    """decode.greedy's tokens and the logits of every step (read off the LM head by a hook)."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out[0, -1].clone()))
    try:
        tokens = decode.greedy(model, ids, n_new)[0]
    finally:
        handle.remove()
    return tokens, torch.stack(seen)                                          # [n_new + 1, vocab]


@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_static_decode_at_half_density_matches_a_pruned_model(bench, kernel):
    loaded, cal, ids = bench
    want_tokens, want = _decode_logits(_pruned(loaded, cal, 0.5), ids, N_NEW)
    with sparsified(loaded, Policy("static", 0.5), kernel=kernel, calibration=cal):
        tokens, got = _decode_logits(loaded.model, ids, N_NEW)
    assert tokens == want_tokens
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    dense_tokens, dense = _decode_logits(loaded.model, ids, N_NEW)
    assert (dense[0] - want[0]).abs().max() > 1e-3                     # half the neurons do matter


def test_static_calibration_counts_the_oracle_top_k(bench):
    loaded, cal, _ = bench
    calib_ids = decode.calibration_ids(CFG)
    inputs = {}
    handles = [m.dense.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0]))
               for i, m in enumerate(mlps(loaded.model))]
    try:
        with torch.no_grad():
            loaded.model(input_ids=calib_ids)
    finally:
        for h in handles:
            h.remove()
    row = GRID.index(0.25)
    for i, m in enumerate(mlps(loaded.model)):
        x = inputs[i].reshape(-1, CFG.hidden).double()
        h = F.silu(x @ m.dense.gate_proj.weight.double().T) * (x @ m.dense.up_proj.weight.double().T)
        k = round(0.25 * CFG.intermediate)
        counts = torch.zeros(CFG.intermediate, dtype=torch.long)
        for token in h.abs().tolist():
            counts[sorted(range(len(token)), key=lambda j: (-token[j], j))[:k]] += 1
        assert cal.counts[(i, -1)][row].tolist() == counts.tolist()
        assert cal.static_ids((i, -1), 0.25, k).tolist() == _by_hand_static_ids(counts, k)
    assert not cal.predictors and cal.n_tokens == calib_ids.numel()


def test_mlp_share_is_a_share_and_leaves_no_hooks(bench):
    loaded, _, ids = bench
    f = decode.mlp_share(loaded, ids, 4)
    assert 0 < f < 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in loaded.model.modules())


def test_ideal_speedup_is_amdahl():
    assert decode.ideal_speedup(0.6, 0.1) == pytest.approx(1 / (0.4 + 0.06))
    assert decode.ideal_speedup(1.0, 0.25) == pytest.approx(4.0)
    assert decode.ideal_speedup(0.0, 0.1) == pytest.approx(1.0)
    assert decode.ideal_speedup(0.7, 1.0) == pytest.approx(1.0)


def test_row_math():
    r = decode.row(0.1, [0.02, 0.05, 0.03], [0.01, 0.012, 0.5], 0.5, CFG)
    assert r["dense_tok_s"] == pytest.approx(1 / 0.03) and r["sparse_tok_s"] == pytest.approx(1 / 0.012)
    assert r["speedup"] == pytest.approx(2.5)
    assert r["ideal_speedup"] == pytest.approx(1 / 0.55)
    assert r["share_of_ideal"] == pytest.approx(2.5 * 0.55)
    assert r["layers"] == CFG.layers and r["policy"] == "static" and r["kernel"] == "cpu"


def test_cli_prints_rows_as_json(monkeypatch, capsys):
    monkeypatch.setattr(decode, "QUICK", CFG)                      # --quick at test size
    assert cli.main(["bench", "decode", "--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["density"] for r in rows] == list(decode.DENSITIES)
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("dense_tok_s", "sparse_tok_s", "speedup",
                                                              "ideal_speedup", "share_of_ideal"))
        assert r["ideal_speedup"] == pytest.approx(1 / (1 - r["f_mlp"] + r["f_mlp"] * r["density"]))
        assert r["hidden"] == CFG.hidden and r["vocab"] == CFG.vocab


def test_cli_rejects_an_unknown_bench(capsys):
    assert cli.main(["bench", "nothing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


# -- whole-model scope: `bench decode --scope all` ------------------------------------------------------

def test_whole_model_ideal_is_amdahl_on_the_projections_share_by_hand():
    r = decode.row_all(0.4, [0.02, 0.05, 0.03], [0.01, 0.012, 0.5], 0.8, 0.398, CFG)
    assert r["ideal_speedup"] == pytest.approx(1 / ((1 - 0.8) + 0.8 * 0.398))
    assert r["speedup"] == pytest.approx((1 / 0.012) / (1 / 0.03))
    assert r["share_of_ideal"] == pytest.approx(r["speedup"] * ((1 - 0.8) + 0.8 * 0.398))
    assert (r["scope"], r["policy"], r["kernel"], r["f_proj"], r["model_density"]) == ("all", "topk", "cpu", 0.8, 0.398)


def test_projection_share_hooks_every_projection_and_leaves_no_hooks(bench):
    loaded, _, ids = bench
    mods = decode.linears(loaded)
    assert len(mods) == 7 * CFG.layers and all(isinstance(m, torch.nn.Linear) for m in mods)
    f = decode.projection_share(loaded, ids, 4)
    assert 0 < f < 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in loaded.model.modules())


def test_whole_model_model_density_by_hand(bench):
    """topk keeps round(0.4 * d_in) of every projection's input: q, o [64, 64], k, v [32, 64], gate, up
    [128, 64], down [64, 128] at test size."""
    loaded, _, ids = bench
    d_out = {"q": 64, "k": 32, "v": 32, "o": 64, "gate": 128, "up": 128, "down": 64}
    d_in = {"q": 64, "k": 64, "v": 64, "o": 64, "gate": 64, "up": 64, "down": 128}
    want = sum(d_out[n] * round(0.4 * d_in[n]) for n in d_in) / sum(d_out[n] * d_in[n] for n in d_in)
    assert decode.model_density(loaded, Policy("topk", 0.4, scope="all"), ids) == pytest.approx(want, rel=1e-12)


def test_cli_scope_all_quick_run_gives_a_row_per_whole_model_density(monkeypatch, capsys):
    monkeypatch.setattr(decode, "QUICK", CFG)
    assert cli.main(["bench", "decode", "--quick", "--json", "--scope", "all"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["density"] for r in rows] == list(decode.WHOLE_DENSITIES) == [0.25, 0.4, 0.5, 0.65]
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("dense_tok_s", "sparse_tok_s", "speedup",
                                                              "ideal_speedup", "share_of_ideal", "f_proj"))
        assert r["ideal_speedup"] == pytest.approx(1 / (1 - r["f_proj"] + r["f_proj"] * r["model_density"]))
        assert abs(r["model_density"] - r["density"]) < 0.02 and r["scope"] == "all"
