"""The dense model families of 2024-2026 (issue 13, part A): Pythia (gpt_neox), Gemma 3, OLMo 2 and 3,
SmolLM3 and StarCoder2; and the GLU families supported before without a test (Qwen3, Gemma, Gemma 2,
OLMo, Phi-3). Each is built at a tiny size from its config here, saved as a checkpoint under
an allowed root and loaded as a user's checkpoint is; each is checked against the same folder loaded
by transformers alone (the model as shipped), and against the MLP equation written out here:

h = act(W_in x + b_in) [* (W_up x)];  top-k keeps the k = round(density * d_ff) largest |h_j| per
token (ties to the lower index), the rest are 0;  y = W_out h + b_out.
"""
import itertools
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.activations import ACT2FN

from conftest import HELD_OUT
from sam_viz.models import InputError, load_model
from sam_viz.models.loading import minilm_path
from sam_viz import RunSpec, analyze
from sam_viz.sparse_ops import Policy, Recorder, sparsified
from sam_viz.sparse_ops.cpu import activation_code, readiness
from sam_viz.sparse_ops.mlp import install
from test_app import open_app

pytestmark = pytest.mark.usefixtures("one_thread")      # tiny models: threads only wait on each other

PROMPT = "Pythia, Gemma and OLMo read these words one token at a time, with a sliding window."
D_FF = 128
ACT = {  # the activations by their equations
    "gelu": lambda v: 0.5 * v * (1 + torch.erf(v / math.sqrt(2))),
    "gelu_pytorch_tanh": lambda v: 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))),
    "silu": lambda v: v * torch.sigmoid(v),
}
GLU = ("gate_proj", "up_proj", "down_proj")
FUSED = ("gate_up_proj", "halves", "down_proj")       # one projection, gate rows first, then up (Phi-3)
SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
# model_type: (the MLP's W_in, W_up, W_out as transformers names them, activation, extra config).
# Sliding windows of 4 tokens, shorter than PROMPT, so that sliding and global layers differ.
FAMILIES = {  # issue 13
    "gpt_neox": (("dense_h_to_4h", None, "dense_4h_to_h"), "gelu", {}),
    "gemma3_text": (GLU, "gelu_pytorch_tanh", dict(head_dim=16, **SLIDING)),
    "olmo2": (GLU, "silu", {}),
    "olmo3": (GLU, "silu", SLIDING),
    "smollm3": (GLU, "silu", {}),
    "starcoder2": (("c_fc", None, "c_proj"), "gelu_pytorch_tanh", {}),
}
EARLIER = {  # supported before issue 13, without a tiny-* spec or any test of their own
    "qwen3": (GLU, "silu", {}),
    "gemma": (GLU, "gelu_pytorch_tanh", dict(head_dim=16)),
    "gemma2": (GLU, "gelu_pytorch_tanh", dict(head_dim=16, **SLIDING)),
    "olmo": (GLU, "silu", {}),
    "phi3": (FUSED, "silu", {}),
}
ALL = {**FAMILIES, **EARLIER}
ACT_KEY = {"gemma2": "hidden_activation", "gemma3_text": "hidden_activation"}   # else hidden_act


def _config(model_type: str, tokenizer, **extra):
    _, act, kwargs = ALL[model_type]
    heads = {} if model_type == "gpt_neox" else dict(num_key_value_heads=2)
    return AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=D_FF, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        **{ACT_KEY.get(model_type, "hidden_act"): act, **heads, **kwargs, **extra})


def _save(path, config, tokenizer):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """family(model_type) -> (checkpoint path, the model loaded through load_model), built once."""
    root = tmp_path_factory.mktemp("families")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAM_VIZ_MODEL_ROOTS", str(root))

        def get(model_type):
            if model_type not in made:
                path = _save(root / model_type, _config(model_type, tokenizer), tokenizer)
                made[model_type] = path, load_model(path)
            return made[model_type]
        yield get


def _as_shipped(path):
    """The checkpoint as transformers alone loads it: no sam-viz module in the way."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model, enc):
    with torch.no_grad():
        return model(**enc).logits


def _by_hand(model, model_type, keep):
    """Hooks on a fresh model's MLPs: y = W_out (h * keep(layer, h, score)) + b_out, h by the equation
    and score = |act(W_in x + b_in)| (CATS' score: |h| itself without a GLU)."""
    (w_in, w_up, w_out), act, _ = ALL[model_type]

    def hook(mlp, args, out, layer):
        x = args[0]
        pre = x @ getattr(mlp, w_in).weight.T + _bias(getattr(mlp, w_in))
        gate, up = pre.chunk(2, dim=-1) if w_up == "halves" else (pre, None)
        if w_up not in (None, "halves"):
            up = x @ getattr(mlp, w_up).weight.T
        h = ACT[act](gate) if up is None else ACT[act](gate) * up
        down = getattr(mlp, w_out)
        return (h * keep(layer, h, ACT[act](gate).abs())) @ down.weight.T + _bias(down)

    return [layer.mlp.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i))
            for i, layer in enumerate(model.base_model.layers)]


def _bias(linear):
    return 0.0 if linear.bias is None else linear.bias


def _top_k(h, k):
    order = torch.argsort(-h.abs(), dim=-1, stable=True)
    return torch.zeros_like(h, dtype=torch.bool).scatter_(-1, order[..., :k], True)


def _expected(path, model_type, enc, keep):
    model = _as_shipped(path)
    handles = _by_hand(model, model_type, keep)
    try:
        return _logits(model, enc)
    finally:
        for handle in handles:
            handle.remove()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("model_type", ALL)
def test_dense_equals_the_model_as_shipped(model_type, family):
    path, loaded = family(model_type)
    assert (loaded.kind, loaded.model_type, loaded.n_layers, loaded.d_ff) == ("causal-lm", model_type, 2, D_FF)
    enc = loaded.encode(PROMPT)
    expected = _logits(_as_shipped(path), enc)
    install(loaded)                                   # the wrappers in place, no run active
    assert (_logits(loaded.model, enc) - expected).abs().max() <= 1e-5
    for policy in (Policy("dense"), Policy("topk", 1.0)):
        with sparsified(loaded, policy):
            assert (_logits(loaded.model, enc) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("model_type", ALL)
def test_topk_quarter_density_in_every_layer(model_type, family):
    path, loaded = family(model_type)
    result = analyze(loaded, RunSpec(prompt=PROMPT, model=path, policy="topk", density=0.25, kernel="reference"))
    assert len(result.layers) == 2
    for layer in result.layers:
        assert layer.selected.tolist() == [D_FF // 4] * len(result.tokens)
        assert int(layer.selected.sum()) / int(layer.possible.sum()) == 0.25
    assert result.density == 0.25


@pytest.mark.parametrize("model_type", ALL)
def test_topk_equals_masked_mlp_by_hand(model_type, family):
    path, loaded = family(model_type)
    enc = loaded.encode(PROMPT)
    expected = _expected(path, model_type, enc, lambda layer, h, score: _top_k(h, D_FF // 4))
    with sparsified(loaded, Policy("topk", 0.25)):
        got = _logits(loaded.model, enc)
    assert _rel(got, expected) <= 1e-5


@pytest.mark.skipif(readiness()[0] == "unavailable", reason="the cpu kernel cannot be built here")
@pytest.mark.parametrize("model_type", ALL)
def test_cpu_kernel_computes_each_family_like_reference(model_type, family):
    path, loaded = family(model_type)
    runs = [analyze(loaded, RunSpec(prompt=PROMPT, model=path, policy="topk", density=0.25, kernel=k))
            for k in ("reference", "cpu")]
    for ref, cpu in zip(*(r.layers for r in runs)):
        assert torch.equal(ref.ids, cpu.ids)
        torch.testing.assert_close(cpu.values.float(), ref.values.float(), rtol=1e-3, atol=1e-4)
    assert runs[1].compare["kl"] == pytest.approx(runs[0].compare["kl"], rel=1e-3, abs=1e-6)


def _recorded_masks(loaded, policy, enc):
    """Run `policy`; return the logits and keep(layer, h, score): the neurons the run recorded per token."""
    rec = Recorder()
    with sparsified(loaded, policy, recorder=rec) as run:
        logits = _logits(loaded.model, enc)
    firing = rec.layers(enc["input_ids"].shape[1], loaded.d_ff)

    def keep(layer, h, score):
        mask = torch.zeros_like(h, dtype=torch.bool)
        for t in range(h.shape[-2]):
            mask[..., t, firing[layer].token(t)[0].long()] = True
        return mask
    return logits, keep, run, firing


@pytest.mark.parametrize("model_type", ["gpt_neox", "gemma3_text"])
def test_threshold_keeps_the_cats_score_above_the_calibrated_value(model_type, family):
    """S = {j : |act(W_in x + b_in)_j| > t_layer} (without a GLU: |h_j|); density near the target."""
    path, loaded = family(model_type)
    enc = loaded.encode(HELD_OUT[3])
    logits, _, run, _ = _recorded_masks(loaded, Policy("threshold", 0.3), enc)
    thresholds = dict(run.thresholds)
    expected = _expected(path, model_type, enc, lambda layer, h, score: score > thresholds[layer])
    assert _rel(logits, expected) <= 1e-5
    selected = possible = 0
    for prompt in HELD_OUT:
        result = analyze(loaded, RunSpec(prompt=prompt, model=path, policy="threshold", density=0.3,
                                         kernel="reference"))
        selected += sum(int(layer.selected.sum()) for layer in result.layers)
        possible += sum(int(layer.possible.sum()) for layer in result.layers)
    assert abs(selected / possible - 0.3) <= 0.05


@pytest.mark.parametrize("kind", ["predictor", "static"])
def test_predictor_and_static_on_gpt_neox(kind, family):
    """Exactly k neurons per token (static: the same k for every token), and the output is the masked
    MLP over exactly the neurons recorded."""
    path, loaded = family("gpt_neox")
    enc = loaded.encode(HELD_OUT[0])
    logits, keep, _, firing = _recorded_masks(loaded, Policy(kind, 0.25), enc)
    n = enc["input_ids"].shape[1]
    for layer in firing:
        assert layer.selected.tolist() == [D_FF // 4] * n
        sets = {tuple(sorted(layer.token(t)[0].tolist())) for t in range(n)}
        assert len(sets) == 1 if kind == "static" else len(sets) > 1
    assert _rel(logits, _expected(path, "gpt_neox", enc, keep)) <= 1e-5


def test_unsupported_family_is_one_sentence_listing_the_supported(tmp_path, monkeypatch):
    config = AutoConfig.for_model("mamba", vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mamba", safe_serialization=True)
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path))
    with pytest.raises(InputError) as info:
        load_model(str(tmp_path / "mamba"))
    message = str(info.value)
    assert message.startswith("model_type 'mamba' is not supported; supported: ") and "\n" not in message
    listed = message.split("supported: ")[-1].split(", ")
    assert set(ALL) | {"llama", "mistral", "qwen2", "gpt2", "opt", "bert", "mixtral"} <= set(listed)


@pytest.mark.parametrize("name", sorted({act for _, act, _ in ALL.values()}))
def test_cpu_kernel_knows_each_family_activation_by_its_equation(name):
    """The activation transformers builds for each family's hidden_act is the one the kernel's code
    computes, over the curve and far out."""
    from sam_viz.sparse_ops.cpu import ACTIVATIONS

    v = torch.cat([torch.linspace(-8, 8, 401), torch.tensor([-50.0, 50.0, 300.0])])
    torch.testing.assert_close(ACTIVATIONS[activation_code(ACT2FN[name])](v), ACT[name](v), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gelu_10", "relu6", "quick_gelu", "relu2"])
def test_cpu_kernel_refuses_an_activation_it_does_not_compute(name):
    """gelu_10 and relu6 agree with GELU / ReLU near zero and clip far out: refused, not mistaken."""
    act = ACT2FN[name]
    with pytest.raises(InputError, match=f"^the cpu kernel does not implement the activation {type(act).__name__};"):
        activation_code(act)


@pytest.mark.skipif(readiness()[0] == "unavailable", reason="the cpu kernel cannot be built here")
def test_a_clipped_activation_is_refused_by_the_cpu_kernel_and_runs_on_reference(tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    path = _save(tmp_path / "pythia-gelu10", _config("gpt_neox", tokenizer, hidden_act="gelu_10"), tokenizer)
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path))
    loaded = load_model(path)
    with pytest.raises(InputError, match="^the cpu kernel does not implement the activation ClippedGELUActivation;"):
        analyze(loaded, RunSpec(prompt=PROMPT, model=path, policy="topk", density=0.25, kernel="cpu"))
    result = analyze(loaded, RunSpec(prompt=PROMPT, model=path, policy="topk", density=0.25, kernel="reference"))
    assert result.density == 0.25


def test_readme_lists_every_supported_family():
    """The README's families table has a row for every model_type an adapter covers, and no other."""
    from sam_viz.models.adapters import ADAPTERS

    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    start = lines.index("| family | `model_type` | MLP | tiny-config test |")
    rows = itertools.takewhile(lambda line: line.startswith("|"), lines[start + 2:])
    assert sorted(row.split("|")[2].strip(" `") for row in rows) == sorted(ADAPTERS)


def _firing_page(monkeypatch, tmp_path, **params):
    """The firing map opened from a URL, as a user's link opens it."""
    monkeypatch.setenv("SAM_VIZ_RUN_DB", str(tmp_path / "runs.sqlite"))
    return open_app("firing", **params)


def test_firing_page_on_a_gemma3_checkpoint(family, monkeypatch, tmp_path):
    path, _ = family("gemma3_text")
    at = _firing_page(monkeypatch, tmp_path, model=path, prompt=PROMPT, policy="topk", density="0.25",
                      kernel="reference")
    assert not at.exception and not at.error
    analysis = at.session_state["ctx"].analysis
    assert analysis.spec.model == path and analysis.density == 0.25


@pytest.mark.skipif(readiness()[0] == "unavailable", reason="the cpu kernel cannot be built here")
def test_firing_page_says_in_one_sentence_that_the_cpu_kernel_lacks_the_activation(monkeypatch, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    path = _save(tmp_path / "pythia-gelu10", _config("gpt_neox", tokenizer, hidden_act="gelu_10"), tokenizer)
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path))
    at = _firing_page(monkeypatch, tmp_path, model=path, prompt=PROMPT, policy="topk", density="0.25", kernel="cpu")
    assert not at.exception
    assert [e.value.split(";")[0] for e in at.error] == [
        "the cpu kernel does not implement the activation ClippedGELUActivation"]
    assert "\n" not in at.error[0].value


@pytest.mark.skipif(readiness()[0] == "unavailable", reason="the cpu kernel cannot be built here")
def test_one_click_moves_a_model_the_cpu_kernel_lacks_to_the_reference_kernel(monkeypatch, tmp_path):
    """A gpt-oss or gelu_10 checkpoint under the sidebar's default kernel (cpu): the refusal comes with
    a button; after it the page shows the reference kernel's analysis and the link says so."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    path = _save(tmp_path / "pythia-gelu10", _config("gpt_neox", tokenizer, hidden_act="gelu_10"), tokenizer)
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(tmp_path))
    at = _firing_page(monkeypatch, tmp_path, model=path, prompt=PROMPT, policy="topk", density="0.25", kernel="cpu")
    switch = [b for b in at.button if b.label == "Use the reference kernel"]
    assert len(at.error) == 1 and len(switch) == 1
    at.selectbox(key="model").options.append(path)   # as the browser sends a typed-in option back
    switch[0].click().run()
    assert not at.exception and not at.error
    shown = at.session_state["ctx"].analysis
    alone = analyze(load_model(path), RunSpec(prompt=PROMPT, model=path, policy="topk", density=0.25,
                                               kernel="reference"))
    assert shown.spec.kernel == "reference" and at.query_params["kernel"] == "reference"
    assert shown.tokens == alone.tokens and shown.compare == pytest.approx(alone.compare, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma", "olmo2", "gpt_neox"])
def test_a_profile_logit_effect_goes_through_the_final_norm_as_the_family_defines_it(model_type, family,
                                                                                      monkeypatch):
    """Per neuron, the logits its down column moves: unembed @ (scale * W_down[:, j]), where the final
    norm's scale is its weight, and 1 + weight in Gemma's RMSNorm (transformers' modeling_gemma*)."""
    from sam_viz.profile.tables import LOGIT_TOP, logits_table

    path, _ = family(model_type)
    monkeypatch.setenv("SAM_VIZ_MODEL_ROOTS", str(Path(path).parent))
    loaded = load_model(path)                                   # a copy of its own: the norm is changed
    norm = loaded.model.base_model.norm if hasattr(loaded.model.base_model, "norm") else \
        loaded.model.base_model.final_layer_norm
    norm.weight.copy_(torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(1)))
    scale = norm.weight + 1 if model_type.startswith("gemma") else norm.weight
    table = logits_table(loaded, lambda ids: [str(i) for i in ids]).to_pandas()
    unembed = loaded.model.get_output_embeddings().weight
    for layer in range(loaded.n_layers):
        down = dict(loaded.model.base_model.layers[layer].mlp.named_parameters())
        w_down = next(t for name, t in down.items() if name.endswith(("down_proj.weight", "dense_4h_to_h.weight")))
        for j in (0, 17, D_FF - 1):
            effect = unembed @ (scale * w_down[:, j])
            got = table[(table.layer == layer) & (table.neuron == j) & (table.sign == "boost")].sort_values("rank")
            want = effect.topk(LOGIT_TOP)
            assert got.token_id.tolist() == want.indices.tolist()
            assert got.value.to_numpy() == pytest.approx(want.values.double().numpy(), rel=1e-4, abs=1e-6)
