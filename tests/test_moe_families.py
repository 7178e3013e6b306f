"""The MoE families of transformers 5.24 (qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss, llama4_text,
granitemoe), each a tiny random checkpoint built here from AutoConfig.for_model, saved under an allowed
root and loaded by path as a user's checkpoint is.

References are independent of sparse_ops: the model as shipped (from_pretrained, no wrapper), the
family's own router module called on the hidden states that reached its MoE block, and the README's
density rule written out per family (routed experts picked + shared experts, per token).
"""
import json
import math
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from conftest import HELD_OUT
from sam_viz.models import load_model
from sam_viz import RunSpec, analyze
from sam_viz.sparse_ops import Policy, Recorder, calibration_texts, sparsified
from sam_viz.store import analysis_from_bytes, analysis_to_bytes
from sam_viz.sparse_ops import calibration as calibration_module
from sam_viz.sparse_ops.calibration import Calibration, Settings, collect, topk_counts, train_predictor
from sam_viz.sparse_ops.recorder import DensityCounter
from sam_viz.sparse_ops.kernels import available_kernels
from sam_viz.sparse_ops.mlp import install

FAMILIES = ["qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "llama4_text", "granitemoe"]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=16, shared_expert_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=8, intermediate_size_mlp=64, interleave_moe_layer_step=2,
            swiglu_limit=1.0, max_position_embeddings=512)
OVERRIDES = {"deepseek_v3": dict(num_key_value_heads=4)}      # MLA: every head has its own keys and values
# Neurons the model as shipped computes per token in each layer, by the README's rule: the picked
# routed experts' (2 of 4) plus the shared experts'; a dense layer's own d_ff.
PER_TOKEN = {
    "qwen2_moe": [2 * 16 + 32] * 3,        # routed d_ff 16, shared expert 32 (sigmoid-gated)
    "qwen3_moe": [2 * 16] * 3,
    "olmoe": [2 * 64] * 3,
    "deepseek_v3": [64, 2 * 16 + 16, 2 * 16 + 16],   # first layer dense; shared = 1 x 16
    "gpt_oss": [2 * 64] * 3,
    "llama4_text": [64, 2 * 64 + 64, 64],            # MoE every 2nd layer; shared expert 64
    "granitemoe": [2 * 64] * 3,
}
DENSE_LAYERS = {"deepseek_v3": [0], "llama4_text": [0, 2]}                         # layers without a router
MOE_BLOCK = {"llama4_text": "feed_forward", "granitemoe": "block_sparse_moe"}       # else "mlp"
ROUTER = {"gpt_oss": "router", "llama4_text": "router", "granitemoe": "router"}       # else "gate"
PROMPT = HELD_OUT[0]
ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: 256 byte tokens and 3 special ones. A vocabulary this small keeps
    the tiny models' logits cheap (the calibration passes run thousands of tokens)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """family -> path of its tiny checkpoint (random weights of scale 0.3, seed 0)."""
    root = tmp_path_factory.mktemp("moe-ckpts")
    tok = byte_tokenizer()
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    out = {}
    for family in FAMILIES:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **TINY | OVERRIDES.get(family, {}), **ids), dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        out[family] = root / family
        model.save_pretrained(out[family])
        tok.save_pretrained(out[family])
    return out


_LOADED = {}


@pytest.fixture
def moe(checkpoints, monkeypatch):
    """family -> (loaded model shared by the tests, as the app's cache shares it; path)."""
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(next(iter(checkpoints.values())).parent))

    def get(family):
        if family not in _LOADED:
            _LOADED[family] = load_model(str(checkpoints[family]))
        return _LOADED[family]
    return get


def _shipped(checkpoints, family):
    return AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.float32).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_equals_the_model_as_shipped(family, moe, checkpoints):
    m, shipped = moe(family), _shipped(checkpoints, family)
    enc = m.encode(PROMPT)
    with torch.no_grad():
        expected = shipped(**enc).logits
        for policy in (Policy("dense"), Policy("topk", 1.0)):
            with sparsified(m, policy):
                got = m.model(**enc).logits
            assert (got - expected).abs().max() <= 1e-5, policy
        assert (m.model(**enc).logits - expected).abs().max() <= 1e-5          # outside any run


@pytest.mark.parametrize("family", FAMILIES)
def test_topk_quarter_gives_density_quarter_in_every_layer(family, moe):
    m = moe(family)
    a = analyze(m, RunSpec(prompt=PROMPT, model=m.spec, policy="topk", density=0.25, kernel="reference"))
    n = len(a.tokens)
    assert a.density == 0.25
    for i, (lf, per_token) in enumerate(zip(a.layers, PER_TOKEN[family])):
        assert lf.possible.tolist() == [per_token] * n, i
        assert lf.selected.tolist() == [per_token // 4] * n, i
        assert int(lf.ids.max()) < a.n_neurons
    assert a.dense_layers[0].activations.shape == (n, a.n_neurons)
    assert analysis_from_bytes(analysis_to_bytes(a)).n_neurons == a.n_neurons          # a saved run keeps it
    counter = DensityCounter(m.d_ff)                    # eval's light counter counts the same neurons
    with torch.no_grad(), sparsified(m, Policy("topk", 0.25), recorder=counter):
        m.model(**m.encode(PROMPT))
    assert counter.counts() == {i: (int(l.selected.sum()), int(l.possible.sum())) for i, l in enumerate(a.layers)}


def _moe_blocks(layers, family):
    block = MOE_BLOCK.get(family, "mlp")
    return {i: getattr(layer, block) for i, layer in enumerate(layers)
            if hasattr(getattr(layer, block), ROUTER.get(family, "gate"))}


def _router_top(router, x, family) -> torch.Tensor:
    """The experts the family's own router picks for x [N, d], as sorted sets [N, top_k]."""
    out = router(x)
    ids = (out[0] > 0).nonzero()[:, 1].reshape(x.shape[0], -1) if family == "llama4_text" else out[2]
    return ids.sort(-1).values


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_routing_is_the_routers_own_topk(family, moe, checkpoints):
    """Inside a top-k run, the hidden states entering each MoE block are captured; the shipped model's
    router (a fresh copy) picks experts for them; the recorder must hold exactly those."""
    m, shipped = moe(family), _shipped(checkpoints, family)
    wrappers, blocks = install(m), _moe_blocks(shipped.model.layers, family)
    captured, handles = {}, []
    for i in blocks:
        handles.append(wrappers[i].register_forward_pre_hook(
            lambda mod, args, i=i: captured.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))))
    rec = Recorder()
    try:
        with torch.no_grad(), sparsified(m, Policy("topk", 0.25), recorder=rec):
            m.model(**m.encode(PROMPT))
    finally:
        for h in handles:
            h.remove()
    layers = rec.layers(captured[next(iter(captured))].shape[0], m.n_neurons)
    assert sorted(blocks) == sorted(captured) == [i for i in range(3) if i not in DENSE_LAYERS.get(family, [])]
    for i, block in blocks.items():
        with torch.no_grad():
            expected = _router_top(getattr(block, ROUTER.get(family, "gate")), captured[i], family)
        assert torch.equal(layers[i].experts.long().sort(-1).values, expected), i
        assert float(layers[i].router_entropy.max()) <= math.log(m.n_experts) + 1e-5
    assert all(layers[i].experts is None for i in range(m.n_layers) if i not in blocks)


def _quick_calibration(m) -> Calibration:
    """The calibration's own steps (collect, train_predictor, topk_counts) on 32 train texts and 40
    training steps: the full one takes minutes on a busy 2-core machine."""
    collector, n = collect(m, calibration_texts()["train"][:32], lambda frac, text: None)
    settings = Settings(steps=40, batch=256)
    units = sorted(collector.x)
    return Calibration("quick", settings, {u: train_predictor(*collector.data(u), settings) for u in units},
                       {u: topk_counts(collector.data(u)[1]) for u in units}, n_tokens=n)


# Predictor parameters read per token by hand: a unit of d_ff f has a d -> r -> f predictor, r = 8 here
# (d / 8 = 4, raised to 8), so r * d + f * r + f parameters; per token, 2 routed experts per MoE layer,
# its shared expert, and each dense layer.
UNIT = {f: 8 * 32 + f * 8 + f for f in (16, 64)}
PREDICTOR_PER_TOKEN = {"qwen3_moe": 3 * 2 * UNIT[16], "gpt_oss": 3 * 2 * UNIT[64],
                       "deepseek_v3": UNIT[64] + 2 * (2 * UNIT[16] + UNIT[16])}


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_calibrated_policies_run(family, moe, monkeypatch):
    """threshold reaches about the target on held-out text; predictor and static pick exactly
    round(0.25 * d_ff) of every unit's neurons (routed, shared and dense), so exactly 0.25."""
    m = moe(family)
    cal = _quick_calibration(m)
    assert {e for _, e in cal.predictors} == set(range(m.n_experts + (family == "deepseek_v3"))) | (
        {-1} if family == "deepseek_v3" else set())            # routed, shared, and the dense first layer
    enc = m.encode(HELD_OUT[2])
    n = enc["input_ids"].shape[1]
    for policy in ("threshold", "predictor", "static"):
        rec = Recorder()
        with torch.no_grad(), sparsified(m, Policy(policy, 0.25), recorder=rec, calibration=cal):
            logits = m.model(**enc).logits
        layers = rec.layers(n, m.n_neurons)
        density = sum(int(l.selected.sum()) for l in layers) / sum(int(l.possible.sum()) for l in layers)
        if policy == "threshold":
            assert 0.1 < density < 0.45, density
        else:
            assert density == 0.25 and all(l.density == 0.25 for l in layers), policy
        assert torch.isfinite(logits).all()
    monkeypatch.setitem(calibration_module._CALIBRATIONS, m.model, cal)        # the app finds it as its own
    a = analyze(m, RunSpec(prompt=HELD_OUT[2], model=m.spec, policy="predictor", density=0.25, kernel="reference"))
    assert a.cost["predictor_params"] == pytest.approx(PREDICTOR_PER_TOKEN[family])


@pytest.mark.skipif("cpu" not in available_kernels(), reason="the cpu kernel cannot be built here")
@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_kernel_computes_the_activation(family, moe):
    """Every family's experts, gpt-oss's clamped SwiGLU included, as the reference kernel computes them."""
    m = moe(family)
    enc = m.encode(PROMPT)
    with torch.no_grad(), sparsified(m, Policy("topk", 0.25), kernel="reference"):
        expected = m.model(**enc).logits
    with torch.no_grad(), sparsified(m, Policy("topk", 0.25), kernel="cpu"):
        got = m.model(**enc).logits
    assert (got - expected).abs().max() <= 1e-4


def _routing_page(path, **params) -> AppTest:
    at = AppTest.from_file(str(ROOT / "pages" / "routing.py"), default_timeout=180)
    at.query_params.update(model=str(path), prompt=PROMPT, density="0.25", **params)
    return at.run()


def _chart_text(at) -> str:
    """Titles, subtitles and annotations (an empty figure's message) of every chart on the page."""
    specs = [json.loads(el.proto.spec)["layout"] for el in at.get("plotly_chart")]
    return " ".join(str(s.get("title", {}).get("text", "")) + " ".join(a.get("text", "") for a in s.get("annotations", []))
                    for s in specs)


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_page_shows_the_expert_views(family, moe, checkpoints, tmp_path, monkeypatch):
    """Expert per token, router entropy and expert load on a routing layer; the shared experts as a
    column of their own; a dense layer of an MoE model named as such."""
    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "runs.sqlite"))
    moe_layers = [i for i in range(3) if i not in DENSE_LAYERS.get(family, [])]
    first_moe = moe_layers[0]
    at = _routing_page(checkpoints[family], layer=str(first_moe))
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    text = _chart_text(at)
    assert "experts the router picked" in text and "Router entropy" in text and "Expert load" in text
    load = next(json.loads(el.proto.spec)["data"][0] for el in at.get("plotly_chart")
                if "Expert load" in json.loads(el.proto.spec)["layout"]["title"]["text"])
    shared = family in ("qwen2_moe", "deepseek_v3", "llama4_text")
    assert load["x"][-1] == ("shared" if shared else f"expert {TINY['num_experts'] - 1}")
    if shared:
        assert all(row[-1] == 1.0 for row in load["z"])
    assert any("**shared experts**" in c.value for c in at.caption) == shared
    if first_moe:                                  # layer 0 is a dense MLP of the MoE model
        at = _routing_page(checkpoints[family], layer="0")
        assert not at.exception and not at.error
        said = [i.value for i in at.info] + [_chart_text(at)]       # an empty figure is its sentence, once
        assert sum("Layer 0 is a dense MLP of this mixture-of-experts model" in t for t in said) == 1, said
    assert load["y"] == [f"layer {i}" for i in moe_layers]


@pytest.mark.skipif("cpu" not in available_kernels(), reason="the cpu kernel cannot be built here")
def test_routing_page_runs_gpt_oss_on_the_cpu_kernel(checkpoints, moe, tmp_path, monkeypatch):
    """Once refused (the clamped SwiGLU), now computed by the cpu kernel: no error on the page."""
    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "runs.sqlite"))
    at = _routing_page(checkpoints["gpt_oss"], kernel="cpu")
    assert not at.exception and not at.error, [e.value for e in at.error]


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "llama4_text"])
def test_corpus_profile_counts_units_by_the_density_rule(family, checkpoints, moe, tmp_path):
    """A corpus profile counts what the firing map counts: per token and layer, k = a quarter of each
    computed unit's width (picked routed experts, shared experts, or a dense layer's MLP), so the fire
    counts of layer l sum to tokens x PER_TOKEN[l] / 4; routing layers have a router entropy."""
    import pandas as pd

    from sam_viz.profile import build_profile
    moe(family)
    m = build_profile(str(checkpoints[family]), "builtin:calibration", density=0.25, context=32, max_tokens=256,
                      root=tmp_path)
    neurons = pd.read_parquet(tmp_path / m["id"] / "neurons.parquet")
    fire = neurons.groupby("layer")["fire_count"].sum().to_numpy()
    assert fire.tolist() == [m["tokens"] * n // 4 for n in PER_TOKEN[family]]
    layers = pd.read_parquet(tmp_path / m["id"] / "layers.parquet").set_index("layer")
    dense = DENSE_LAYERS.get(family, [])
    for layer in range(3):
        assert pd.isna(layers.loc[layer, "router_entropy"]) == (layer in dense)
