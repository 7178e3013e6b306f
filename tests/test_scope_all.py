"""Scope all (DESIGN.md, "Sparsity on every projection"): every projection of every block reads only the
kept entries of its input. References are written here, independent of sparse_ops:

- masks by hand: topk keeps the k = round(density * d_in) largest |x_i| per token (numpy's stable
  argsort, so ties go to the lower index), teal |x_i| > t, wina |x_i| * ||W[:, i]||_2 > t, with the
  thresholds of a calibration object made here;
- a fresh Hugging Face copy of each checkpoint (from_pretrained, no sam-viz module in it) with those
  masks applied by forward pre-hooks on its projections, and, for MoE experts (one module for the whole
  bank), a forward hook that returns the experts' equation written out per token.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from sam_viz.models import InputError, load_model
from sam_viz.sparse_ops import Policy, sparsified
from sam_viz.sparse_ops import default_kernel
from sam_viz.sparse_ops.inputs import InputRecorder
from test_moe_families import TINY as MOE_TINY, byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Every projection reads only a few entries of its input, token by token."
DENSE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
CONFIGS = {   # model_type: (config, what it shows)
    "gpt2": (dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=128), "fused qkv, Conv1D"),
    "gpt_neox": (DENSE, "fused qkv, parallel attention and MLP"),
    "llama": (DENSE | dict(num_key_value_heads=2), "grouped-query attention"),
    "phi3": (DENSE | dict(num_key_value_heads=2), "fused qkv and fused gate_up"),
    "opt": (dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                 max_position_embeddings=128), "out_proj, fc1 / fc2"),
    "bert": (DENSE, "an encoder"),
    "mixtral": (MOE_TINY, "MoE, routed experts only"),
    "qwen2_moe": (MOE_TINY, "MoE with a sigmoid-gated shared expert"),
    "deepseek_v3": (MOE_TINY | dict(num_key_value_heads=4), "MLA with a low-rank q, dense then MoE layers"),
    "deepseek_v3-q": (MOE_TINY | dict(num_key_value_heads=4, q_lora_rank=None), "MLA with a full-rank q"),
}
NOT_PROJECTIONS = ("shared_expert_gate",)          # a d -> 1 gate, as the routers: stays dense


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> path of a tiny random checkpoint (weights N(0, 0.3^2), seed 0), built once."""
    root = tmp_path_factory.mktemp("scope-all")
    tok, made = byte_tokenizer(), {}
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAM_VIZ_MODEL_ROOTS", str(root))

        def get(name):
            if name not in made:
                config = AutoConfig.for_model(name.split("-")[0], **CONFIGS[name][0], **ids)
                auto = AutoModel if config.model_type == "bert" else AutoModelForCausalLM
                model = auto.from_config(config, dtype=torch.float32)
                gen = torch.Generator().manual_seed(0)
                with torch.no_grad():
                    for p in model.parameters():
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
                model.save_pretrained(root / name)
                tok.save_pretrained(root / name)
                made[name] = root / name
            return made[name]
        yield get


COMPILED_HERE = ["reference"] + (["cpu"] if default_kernel() == "cpu" else [])


def topk_keep(x: torch.Tensor, density: float) -> torch.Tensor:
    """[..., d] bool: the k = round(density * d) (at least 1) largest |x_i| of each row, ties to the lower index."""
    d = x.shape[-1]
    k = min(d, max(1, round(density * d)))
    a = x.detach().abs().reshape(-1, d).numpy()
    order = np.argsort(-a, axis=-1, kind="stable")[:, :k]
    keep = np.zeros(a.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return torch.from_numpy(keep).reshape(x.shape)


def _fresh(path, model_type):
    auto = AutoModel if model_type == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=torch.float32).eval()


def _layers(model):
    base = model.base_model
    for path in ("layers", "h", "decoder.layers", "encoder.layer"):
        obj = base
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise AssertionError("no layers")


def _hook_everything(model, keep):
    """Pre-hooks masking the input of every projection in the blocks (keep(x) -> bool mask), and a hook
    on each MoE expert bank returning sum over picked experts e of w_e * W_down[e] (h * keep(h)), with
    h = act(gate) * up of W_gate_up[e] (x * keep(x)). Returns the handles."""
    handles = []
    for layer in _layers(model):
        for name, module in layer.named_modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)) and not name.endswith(NOT_PROJECTIONS):
                handles.append(module.register_forward_pre_hook(
                    lambda mod, args: (args[0] * keep(args[0]),) + args[1:]))
            if hasattr(module, "gate_up_proj") and isinstance(module.gate_up_proj, torch.nn.Parameter):
                handles.append(module.register_forward_hook(lambda mod, args, out: _experts(mod, *args, keep=keep)))
    return handles


def _experts(bank, x, index, weights, keep):
    y = torch.zeros_like(x)                                            # [N, d]
    for t in range(x.shape[0]):
        xt = x[t] * keep(x[t][None])[0]
        for e, w in zip(index[t].tolist(), weights[t]):
            gate, up = (bank.gate_up_proj[e] @ xt).chunk(2)
            h = bank.act_fn(gate) * up
            y[t] += w * (bank.down_proj[e] @ (h * keep(h[None])[0]))
    return y


def _out(model, enc, model_type):
    with torch.no_grad():
        out = model(**enc)
    return out.last_hidden_state if model_type == "bert" else out.logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_topk_everywhere_equals_hooks_on_a_fresh_model(name, checkpoint):
    """Whole-model topk at 0.5 and 0.3: the same outputs (<= 1e-4) as the fresh copy with the masks by hand."""
    path, model_type = checkpoint(name), name.split("-")[0]
    loaded, fresh = load_model(str(path)), _fresh(path, model_type)
    enc = loaded.encode(PROMPT)
    dense = _out(fresh, enc, model_type)
    for density in (0.5, 0.3):
        handles = _hook_everything(fresh, lambda x: topk_keep(x, density))
        try:
            expected = _out(fresh, enc, model_type)
        finally:
            for h in handles:
                h.remove()
        for kernel in COMPILED_HERE:                  # the sparse-input kernels: reference, and cpu where built
            with sparsified(loaded, Policy("topk", density, scope="all"), kernel=kernel):
                got = _out(loaded.model, enc, model_type)
            assert (got - expected).abs().max() <= 1e-4, (name, density, kernel)
        assert (got - dense).abs().max() > 1e-3, "the masks changed nothing: the comparison would not tell"
    assert (_out(loaded.model, enc, model_type) - dense).abs().max() <= 1e-5        # outside the run: as shipped


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2_moe", "deepseek_v3"])
def test_density_one_and_dense_under_scope_all_reproduce_the_model(name, checkpoint):
    path, model_type = checkpoint(name), name.split("-")[0]
    loaded, fresh = load_model(str(path)), _fresh(path, model_type)
    enc = loaded.encode(PROMPT)
    expected = _out(fresh, enc, model_type)
    for policy in (Policy("dense", scope="all"), Policy("topk", 1.0, scope="all")):
        rec = InputRecorder(keep_masks=True)
        with sparsified(loaded, policy, kernel="reference", inputs=rec):
            got = _out(loaded.model, enc, model_type)
        assert (got - expected).abs().max() <= 1e-5, policy
        assert rec.model_density(enc["input_ids"].shape[1]) == 1.0


# -- each projection against its equation, with thresholds from a calibration made here ----------------

THRESHOLDS = {"q": 0.25, "k": 0.3, "v": 0.35, "o": 0.2, "gate": 0.3, "up": 0.4, "down": 0.05}   # + 0.1 * layer
WINA_SCALE = 1.5             # wina scores |x_i| * ||W[:, i]||, 1.2 to 2.4 here: thresholds scaled up from teal's


class HandCalibration:
    """threshold(layer, proj, density, allocation), as the input calibration answers; records its calls."""

    def __init__(self, scale: float = 1.0):
        self.scale, self.calls = scale, set()

    def threshold(self, layer, proj, density, allocation, kind):
        assert kind in ("teal", "wina")
        self.calls.add((layer, proj, density, allocation))
        return self.scale * (THRESHOLDS[proj] + 0.1 * layer)


def _by_hand(kind, density, layer, name, x, weight):
    """The kept entries of x [N, d_in] for projection `name` (weight [d_out, d_in]), written out."""
    if kind == "topk":
        return topk_keep(x, density)
    if kind == "teal":
        return x.abs() > THRESHOLDS[name] + 0.1 * layer
    column_norms = torch.sqrt((weight ** 2).sum(dim=0))                               # [d_in]
    return x.abs() * column_norms > WINA_SCALE * (THRESHOLDS[name] + 0.1 * layer)


ATTN = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}


@pytest.mark.parametrize("kind", ["topk", "teal", "wina"])
def test_each_projection_equals_its_equation_with_the_mask_by_hand(kind, checkpoint):
    """Llama: q, k, v, o: y = F.linear(x * mask, W); the MLP: h = silu(W_g (x * m_g)) * W_u (x * m_u),
    y = W_d (h * m_h), every mask by hand from the tensors that reached the module."""
    from sam_viz.sparse_ops import install_projections

    loaded = load_model(str(checkpoint("llama")))
    install_projections(loaded)                                      # the wrappers, to hook (what a run installs)
    cal = HandCalibration(WINA_SCALE if kind == "wina" else 1.0)
    seen, shares, handles = [], [], []
    for i, layer in enumerate(loaded.layers):
        for attr, name in ATTN.items():
            handles.append(getattr(layer.self_attn, attr).register_forward_hook(
                lambda mod, args, out, i=i, name=name: seen.append(("attn", i, name, mod, args[0], out))))
        handles.append(layer.mlp.register_forward_hook(
            lambda mod, args, out, i=i: seen.append(("mlp", i, "mlp", mod, args[0], out))))
    try:
        with torch.no_grad(), sparsified(loaded, Policy(kind, 0.4, scope="all", allocation="uniform"),
                                         kernel="reference", input_calibration=cal):
            loaded.model(**loaded.encode(PROMPT))
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 2 * 5
    for part, i, name, mod, x, out in seen:
        x = x.reshape(-1, x.shape[-1])
        if part == "attn":
            w = mod.dense.weight
            keep = _by_hand(kind, 0.4, i, name, x, w)
            expected = F.linear(x * keep, w)
            shares.append(keep.float().mean())
        else:
            mlp = mod.dense
            wg, wu, wd = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            m_g, m_u = _by_hand(kind, 0.4, i, "gate", x, wg), _by_hand(kind, 0.4, i, "up", x, wu)
            g, u = F.linear(x * m_g, wg), F.linear(x * m_u, wu)
            h = g * torch.sigmoid(g) * u
            m_h = _by_hand(kind, 0.4, i, "down", h, wd)
            expected = F.linear(h * m_h, wd)
            shares += [m_g.float().mean(), m_u.float().mean(), m_h.float().mean()]
        assert (out.reshape(expected.shape) - expected).abs().max() <= 1e-5, (kind, i, name)
    assert all(0.05 < s < 0.95 for s in shares), ("the masks should keep some entries and drop others", shares)
    if kind != "topk":
        assert cal.calls == {(i, n, 0.4, "uniform") for i in range(2) for n in THRESHOLDS}


@pytest.mark.parametrize("kind", ["teal", "wina"])
def test_teal_and_wina_everywhere_equal_threshold_hooks_on_a_fresh_model(kind, checkpoint):
    path = checkpoint("llama")
    loaded, fresh = load_model(str(path)), _fresh(path, "llama")
    enc = loaded.encode(PROMPT)
    handles = []
    for i, layer in enumerate(_layers(fresh)):
        for name, module in layer.named_modules():
            short = name.split(".")[-1]
            proj = ATTN.get(short) or {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}.get(short)
            if proj is not None:
                handles.append(module.register_forward_pre_hook(
                    lambda mod, args, i=i, proj=proj: (args[0] * _by_hand(kind, 0.5, i, proj, args[0], mod.weight),)))
    try:
        expected = _out(fresh, enc, "llama")
    finally:
        for h in handles:
            h.remove()
    cal = HandCalibration(WINA_SCALE if kind == "wina" else 1.0)
    with sparsified(loaded, Policy(kind, 0.5, scope="all"), kernel="reference", input_calibration=cal):
        got = _out(loaded.model, enc, "llama")
    assert (got - expected).abs().max() <= 1e-4
    assert {c[3] for c in cal.calls} == {"greedy"}                  # the default allocation reaches the calibration


def test_topk_mask_equals_a_stable_sort_with_many_ties():
    """Whole-model topk keeps topk_mask(x, k): the k largest abs(x) per row, ties to the lower index,
    which is the set a stable descending sort gives (few distinct values here: ties everywhere)."""
    from sam_viz.sparse_ops.policy import topk_mask

    x = torch.randint(-3, 4, (50, 17), generator=torch.Generator().manual_seed(3)).float()
    for k in (1, 5, 9, 16, 17, 20):
        order = x.abs().sort(dim=-1, descending=True, stable=True).indices[:, :k]
        want = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order, True)
        assert torch.equal(topk_mask(x, k), want), k


# -- density, by hand -----------------------------------------------------------------------------------

def test_model_density_by_hand_for_tiny_llama():
    """tiny-llama: d 64, d_ff 128, 4 heads of 16, 2 key-value heads: q, o [64, 64], k, v [32, 64], gate, up
    [128, 64], down [64, 128]. topk at 0.3 keeps round(0.3 * 64) = 19 of a 64-wide input and 38 of h."""
    from sam_viz import RunSpec, analyze

    loaded = load_model("tiny-llama")
    spec = dict(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.3, kernel="reference")
    d_out = {"q": 64, "k": 32, "v": 32, "o": 64, "gate": 128, "up": 128, "down": 64}
    d_in = {"q": 64, "k": 64, "v": 64, "o": 64, "gate": 64, "up": 64, "down": 128}
    total = sum(d_out[n] * d_in[n] for n in d_out)
    kept = {n: round(0.3 * d_in[n]) for n in d_in}
    a = analyze(loaded, RunSpec(**spec, scope="all"))
    assert a.model_density == pytest.approx(sum(d_out[n] * kept[n] for n in d_out) / total)
    assert a.projections == [{n: kept[n] / d_in[n] for n in d_out}] * 2
    assert a.inputs[1]["k"].kept_mask().sum(-1).tolist() == [19] * len(a.tokens)
    attention = sum(d_out[n] * d_in[n] for n in "qkvo")
    m = analyze(loaded, RunSpec(**spec))                             # scope mlp: attention dense, 38 of 128 neurons
    assert m.model_density == pytest.approx((attention + (total - attention) * 38 / 128) / total)
    assert m.projections[0] == {"q": 1.0, "k": 1.0, "v": 1.0, "o": 1.0, "gate": 38 / 128, "up": 38 / 128,
                                "down": 38 / 128}
    j = a.to_json()
    assert j["scope"] == "all" and j["model_density"] == a.model_density
    assert j["layers"][0]["projections"] == a.projections[0]


# -- scope mlp is unchanged; refusals ---------------------------------------------------------------------

def test_scope_mlp_is_unchanged_by_scope_all_runs_on_the_same_model(checkpoint):
    path = checkpoint("qwen2_moe")
    untouched, used = load_model(str(path)), load_model(str(path))
    enc = used.encode(PROMPT)
    with pytest.raises(RuntimeError), sparsified(used, Policy("topk", 0.3, scope="all")):
        used.model(**enc)
        raise RuntimeError("a run that fails")
    for policy in (Policy("dense"), Policy("topk", 0.3)):
        with torch.no_grad():
            with sparsified(untouched, policy):
                expected = untouched.model(**enc).logits
            with sparsified(used, policy):
                got = used.model(**enc).logits
        assert torch.equal(got, expected), policy
    with torch.no_grad():
        assert torch.equal(used.model(**enc).logits, untouched.model(**enc).logits)


@pytest.mark.parametrize("kwargs,words", [
    (dict(kind="topk", scope="attn"), "unknown scope 'attn'"),
    (dict(kind="threshold", scope="all"), "has no meaning under scope all"),
    (dict(kind="predictor", scope="all"), "has no meaning under scope all"),
    (dict(kind="static", scope="all"), "has no meaning under scope all"),
    (dict(kind="teal"), "runs under scope all only"),
    (dict(kind="wina", scope="mlp"), "runs under scope all only"),
    (dict(kind="teal", scope="all", allocation="best"), "unknown allocation 'best'"),
])
def test_bad_scope_or_policy_is_one_sentence(kwargs, words):
    from sam_viz import RunSpec

    with pytest.raises(InputError, match=words) as err:
        Policy(density=0.5, **kwargs)
    assert "\n" not in str(err.value)
    spec = dict(prompt="hi", policy=kwargs["kind"], scope=kwargs.get("scope", "mlp"),
                allocation=kwargs.get("allocation", "greedy"), kernel="reference")
    with pytest.raises(InputError, match=words):
        RunSpec(**spec)


def test_a_family_without_projections_is_refused_never_half_sparse(checkpoint, monkeypatch):
    from dataclasses import replace

    from sam_viz.cli import main
    from sam_viz.models import ADAPTERS
    from sam_viz.sparse_ops import SparseLinear

    loaded = load_model(str(checkpoint("llama")))
    loaded.adapter = replace(loaded.adapter, projections=None)
    with pytest.raises(InputError, match="scope all is not available for llama"):
        with sparsified(loaded, Policy("topk", 0.5, scope="all")):
            pass
    assert not any(isinstance(m, SparseLinear) for m in loaded.model.modules())
    monkeypatch.setitem(ADAPTERS, "llama", replace(ADAPTERS["llama"], projections=None))
    assert main(["analyze", "--model", "tiny-llama", "--prompt", "hi", "--scope", "all", "--kernel", "reference"]) == 2


@pytest.mark.parametrize("argv", [
    ["analyze", "--model", "tiny-llama", "--prompt", "hi", "--scope", "attention"],
    ["analyze", "--model", "tiny-llama", "--prompt", "hi", "--scope", "all", "--policy", "threshold"],
    ["analyze", "--model", "tiny-llama", "--prompt", "hi", "--policy", "wina"],
    ["eval", "--model", "tiny-llama", "--scope", "everything"],
    ["eval", "--model", "tiny-llama", "--scope", "all", "--policy", "teal", "--allocation", "random"],
    ["attribute", "--model", "tiny-llama", "--prompt", "hi", "--scope", "all", "--policy", "static"],
    ["profile", "--model", "tiny-llama", "--corpus", "builtin:calibration", "--scope", "all", "--policy", "predictor"],
    ["calibrate", "--model", "tiny-llama", "--scope", "some"],
    ["calibrate", "--model", "tiny-llama", "--scope", "all", "--allocation", "even"],
])
def test_cli_refuses_bad_scope_in_one_line_with_exit_2(argv, capsys):
    from sam_viz.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1, err


def test_scope_all_and_mlp_runs_at_once_on_one_model_do_not_mix():
    """Two threads share one model (the app's cache): each computes what it computes alone."""
    import threading

    loaded = load_model("tiny-llama")
    enc = loaded.encode(PROMPT)
    policies = [Policy("topk", 0.3, scope="all"), Policy("topk", 0.3), Policy("topk", 0.6, scope="all")]

    def run(policy):
        with torch.no_grad(), sparsified(loaded, policy, kernel="reference"):
            return loaded.model(**enc).logits

    alone = [run(p) for p in policies]
    together, errors = [[] for _ in policies], []

    def worker(i):
        try:
            for _ in range(5):
                together[i].append(run(policies[i]))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(policies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for expected, got in zip(alone, together):
        assert all(torch.equal(g, expected) for g in got)


def test_a_saved_run_keeps_scope_and_model_density():
    from sam_viz import RunSpec, analyze
    from sam_viz.store import analysis_from_bytes, analysis_to_bytes

    loaded = load_model("tiny-llama")
    a = analyze(loaded, RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.5, kernel="reference",
                                scope="all", allocation="uniform"))
    b = analysis_from_bytes(analysis_to_bytes(a))
    assert b.spec == a.spec and b.spec.scope == "all" and b.spec.allocation == "uniform"
    assert b.model_density == a.model_density and b.projections == a.projections
