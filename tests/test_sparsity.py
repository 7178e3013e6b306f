"""Sparse MLPs against the equations of DESIGN.md, written here independently of sparse_ops.

h = act(W_gate x) * (W_up x)  (GLU)  or  act(W_in x);  y = W_down[:, S] h_S + b.
topk: S = the k = round(density * d_ff) largest abs(h_j), ties to the lower index.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import ALL_SPECS, HELD_OUT, TINY, model_output, shared
from sam_viz import RunSpec, analyze
from sam_viz.sparse_ops import Policy, Recorder, install, sparsified

PROMPT = "Sparse models compute only a few neurons for each token they read."


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("policy", [Policy("dense"), Policy("topk", 1.0), Policy("threshold", 1.0)])
def test_full_density_reproduces_unpatched_model(spec, policy, fresh):
    unpatched = fresh(spec)
    m = shared(spec)
    enc = m.encode(PROMPT)
    with torch.no_grad():
        expected = model_output(unpatched, enc)
        with sparsified(m, policy):
            got = model_output(m, enc)
    assert (got - expected).abs().max() <= 1e-5


def _keep_topk(h: torch.Tensor, k: int) -> torch.Tensor:
    """h with all but its k largest abs values (per row; ties to the lower index) set to 0."""
    order = torch.argsort(-h.abs(), dim=-1, stable=True)
    mask = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, order[..., :k], True)
    return h * mask


# Where each family's down projection sits: its input is h, so masking that input is exactly
# y = W_down[:, S] h_S + b.
DOWN_PROJ = {"tiny-llama": "mlp.down_proj", "tiny-mistral": "mlp.down_proj", "tiny-qwen2": "mlp.down_proj",
             "tiny-gpt2": "mlp.c_proj", "tiny-opt": "fc2", "tiny-bert": "output.dense", "minilm": "output.dense"}


def _masked_dense_hooks(unpatched, density):
    base = unpatched.model.base_model
    layers = base.layers if hasattr(base, "layers") else base.h if hasattr(base, "h") else (
        base.decoder.layers if hasattr(base, "decoder") else base.encoder.layer)
    handles = []
    for layer in layers:
        if unpatched.spec == "tiny-mixtral":
            handles.append(layer.mlp.register_forward_hook(_moe_by_hand(density)))
            continue
        down = layer
        for part in DOWN_PROJ[unpatched.spec].split("."):
            down = getattr(down, part)
        k = round(density * unpatched.d_ff)
        handles.append(down.register_forward_pre_hook(lambda mod, args, k=k: (_keep_topk(args[0], k),)))
    return handles


def _output_with_hooks(unpatched, enc, handles):
    """The untouched model's output with the test's own hooks in place; the hooks are removed after."""
    try:
        with torch.no_grad():
            return model_output(unpatched, enc)
    finally:
        for h in handles:
            h.remove()


def _moe_by_hand(density):
    """Mixtral block: softmax router, top-2 experts renormalised, each expert a GLU with top-k."""
    def hook(block, args, output):
        x = args[0].reshape(-1, args[0].shape[-1])
        probs = F.softmax(x @ block.gate.weight.T, dim=-1)
        w, e = torch.topk(probs, 2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        gu, down = block.experts.gate_up_proj, block.experts.down_proj
        d_ff = down.shape[-1]
        k = round(density * d_ff)
        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for slot in range(2):
                ex = int(e[t, slot])
                h = F.silu(gu[ex, :d_ff] @ x[t]) * (gu[ex, d_ff:] @ x[t])
                y[t] += w[t, slot] * (down[ex] @ _keep_topk(h, k))
        return y.reshape(output.shape)
    return hook


@pytest.mark.parametrize("spec", [*TINY, "minilm"])
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_topk_equals_masked_dense_by_hand(spec, density, fresh):
    unpatched = fresh(spec)
    m = shared(spec)
    enc = m.encode(PROMPT)
    expected = _output_with_hooks(unpatched, enc, _masked_dense_hooks(unpatched, density))
    rec = Recorder()
    with torch.no_grad(), sparsified(m, Policy("topk", density), recorder=rec):
        got = model_output(m, enc)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # exactly k per token per layer (per picked expert for MoE)
    k = round(density * m.d_ff) * max(1, m.experts_per_token)
    n = enc["input_ids"].shape[1]
    layers = rec.layers(n, m.d_ff * max(1, m.n_experts))
    assert len(layers) == m.n_layers
    for layer in layers:
        assert layer.selected.tolist() == [k] * n
        assert (layer.indptr[1:] - layer.indptr[:-1]).tolist() == [k] * n
        for t in range(n):
            ids, _ = layer.token(t)
            assert len(set(ids.tolist())) == k


@pytest.mark.parametrize("spec", ["minilm", "tiny-llama", "tiny-gpt2", "tiny-opt", "tiny-mixtral"])
@pytest.mark.parametrize("density", [0.25, 0.5])
def test_threshold_density_on_held_out_prompts(spec, density):
    m = shared(spec)
    selected = possible = 0
    for prompt in HELD_OUT:
        result = analyze(m, RunSpec(prompt=prompt, model=spec, policy="threshold", density=density))
        selected += sum(int(l.selected.sum()) for l in result.layers)
        possible += sum(int(l.possible.sum()) for l in result.layers)
    assert abs(selected / possible - density) <= 0.05


def _sparse_run_with_mlp_inputs(m, policy, text):
    """Run `text` sparsely with a recorder; return each layer's MLP input [T, d] and its firing."""
    enc = m.encode(text)
    captured = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda mod, args: captured.append(args[0][0])) for layer in m.layers]
    rec = Recorder()
    try:
        with torch.no_grad(), sparsified(m, policy, recorder=rec):
            m.model(**enc)
    finally:
        for h in hooks:
            h.remove()
    captured = captured[-m.n_layers:]          # a calibration pass, if any, came first
    return zip(captured, m.layers, rec.layers(enc["input_ids"].shape[1], m.d_ff))


def test_threshold_is_cats_score_above_a_per_layer_value():
    """Every neuron kept has abs(act(W_gate x)) above every neuron dropped, within each layer."""
    m = shared("tiny-llama")
    for x, layer, firing in _sparse_run_with_mlp_inputs(m, Policy("threshold", 0.3), HELD_OUT[0]):
        dense = layer.mlp.dense
        score = F.silu(x @ dense.gate_proj.weight.T).abs()                    # [T, d_ff]
        kept = torch.zeros_like(score, dtype=torch.bool)
        for t in range(score.shape[0]):
            kept[t, firing.token(t)[0].long()] = True
        assert score[kept].min() > score[~kept].max()


def test_trace_is_compact():
    m = shared("minilm")
    result = analyze(m, RunSpec(prompt=PROMPT, policy="topk", density=0.25))
    n = len(result.tokens)
    for layer in result.layers:
        assert layer.ids.dtype == torch.int16 and layer.values.dtype == torch.float16
        assert layer.ids.numel() == n * round(0.25 * 1536)
    assert result.trace_nbytes() < 6 * n * 1536 * 4 / 2   # far below the dense fp32 maps


def test_recorded_values_are_the_activations():
    """The stored fp16 values are h_j of the neurons listed, computed from the layer input by hand."""
    m = shared("tiny-gpt2")
    for x, layer, firing in _sparse_run_with_mlp_inputs(m, Policy("topk", 0.2), PROMPT):
        c_fc = layer.mlp.dense.c_fc
        h = F.gelu(x @ c_fc.weight + c_fc.bias, approximate="tanh")        # GPT-2's gelu_new
        for t in range(h.shape[0]):
            ids, vals = firing.token(t)
            torch.testing.assert_close(vals.float(), h[t, ids.long()], rtol=2e-3, atol=1e-4)
            mass = h[t].abs()
            torch.testing.assert_close(firing.mass_kept[t], mass[ids.long()].sum(), rtol=2e-3, atol=1e-4)
            torch.testing.assert_close(firing.mass_total[t], mass.sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_threshold_output_equals_masked_dense_by_hand(spec, fresh):
    """With the calibrated thresholds t_l: keep neuron j iff abs(act(W_gate x)_j) > t_l, then
    y = W_down[:, S] h_S + b, computed here on an untouched model."""
    m = shared(spec)
    enc = m.encode(HELD_OUT[3])
    with torch.no_grad(), sparsified(m, Policy("threshold", 0.35)) as run:
        got = model_output(m, enc)
    thresholds = dict(run.thresholds)
    assert sorted(thresholds) == list(range(m.n_layers))

    unpatched = fresh(spec)
    base = unpatched.model.base_model
    layers = base.layers if hasattr(base, "layers") else base.h if hasattr(base, "h") else base.encoder.layer
    handles = []
    for i, layer in enumerate(layers):
        if spec == "tiny-llama":
            def hook(mlp, args, out, t=thresholds[i]):
                x = args[0]
                g = F.silu(x @ mlp.gate_proj.weight.T)
                return ((g * (x @ mlp.up_proj.weight.T)) * (g.abs() > t)) @ mlp.down_proj.weight.T
            handles.append(layer.mlp.register_forward_hook(hook))
        else:  # non-GLU: the score is abs(h) itself, so masking the down projection's input suffices
            down = layer.mlp.c_proj if spec == "tiny-gpt2" else layer.output.dense
            handles.append(down.register_forward_pre_hook(
                lambda mod, args, t=thresholds[i]: (args[0] * (args[0].abs() > t),)))
    expected = _output_with_hooks(unpatched, enc, handles)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


class _WantsH:
    """A recorder that asks for every MLP's h (as the corpus profile's dense pass does)."""
    wants_activations = True

    def __init__(self):
        self.h = {}

    def add(self, layer, rows, ids, values, h_all, offset=0, oracle_k=None, width=None):
        self.h[layer] = h_all

    def add_routing(self, layer, experts, weights, probs):
        pass


@pytest.mark.parametrize("spec", [*[s for s in TINY if s != "tiny-mixtral"], "minilm", "demo-lm"])
def test_dense_pass_with_a_recorder_computes_h_once_and_the_shipped_outputs(spec, fresh):
    """Under the dense policy, a recorder that wants h gets the h that the shipped MLP computes (the
    input of its down projection, by a hook on a fresh copy) and the model's outputs are those of
    the model as shipped, to the bit; W_gate x is computed once per layer (it was twice: the
    shipped modules, then h again for the recorder)."""
    unpatched, m = fresh(spec), shared(spec)
    enc = m.encode(PROMPT)
    downs = [layer.get_submodule(DOWN[m.adapter.family]) for layer in unpatched.layers]
    want_h = {}
    hooks = [d.register_forward_pre_hook(lambda mod, args, i=i: want_h.__setitem__(i, args[0].reshape(
        -1, args[0].shape[-1]))) for i, d in enumerate(downs)]
    try:
        with torch.no_grad():
            expected = model_output(unpatched, enc)
    finally:
        for hook in hooks:
            hook.remove()
    gates = {w.weights().gate.data_ptr() for w in install(m)}            # W_gate (W_in) of each layer
    calls = []

    class CountGate(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (F.linear, torch.addmm) and any(isinstance(t, torch.Tensor) and t.data_ptr() in gates
                                                        for t in args):
                calls.append(func)
            return func(*args, **(kwargs or {}))

    rec = _WantsH()
    with torch.no_grad(), sparsified(m, Policy("dense"), recorder=rec), CountGate():
        got = model_output(m, enc)
    assert torch.equal(got, expected)
    assert all(torch.equal(rec.h[i], want_h[i]) for i in range(len(downs)))
    assert len(calls) == len(downs)


DOWN = {"glu": "mlp.down_proj", "gpt2": "mlp.c_proj", "opt": "fc2", "bert": "output.dense"}    # its input is h
