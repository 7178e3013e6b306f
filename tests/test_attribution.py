"""Attribution through sparse MLPs (captum): completeness, density-1 equality, attribution mass
lost, the encoders' query target, rounding-noise flags, neuron L1 norms against autograd by hand,
and no hooks left behind (also after an error inside the computation)."""
import json
import math

import pytest
import torch

from conftest import HELD_OUT, shared
from sam_viz import RunSpec, analyze
from sam_viz.attribution import FALLBACK_QUERY, attribute, default_query
from sam_viz.cli import main
from sam_viz.sparse_ops import KERNELS, current_run, install, sparsified
from test_isolation import GLOBAL_HOOKS, hook_snapshot

PROMPT = "The old sailor told stories about storms and distant harbours."
EPS32 = torch.finfo(torch.float32).eps


def _pool(out):
    """Mean-pooled, unit last hidden state of a one-sequence batch (no padding)."""
    return torch.nn.functional.normalize(out.last_hidden_state[0].mean(0), dim=0)


def _f_input(m, spec, target):
    """f(x) computed here: the target logit, or the cosine of the embedding to the dense model's
    embedding of the query."""
    enc = m.encode(spec.prompt)
    with torch.no_grad():
        dense = m.model(**enc)
        with sparsified(m, spec.to_policy()):
            sparse = m.model(**enc)
        if m.kind == "causal-lm":
            return float(dense.logits[0, -1, target["id"]]), float(sparse.logits[0, -1, target["id"]])
        query = _pool(m.model(**m.encode(target["query"])))
    return float(_pool(dense) @ query), float(_pool(sparse) @ query)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2", "minilm"])
@pytest.mark.parametrize("policy,density", [("topk", 0.3), ("threshold", 0.4)])
def test_integrated_gradients_are_complete(spec, policy, density):
    m = shared(spec)
    run = RunSpec(prompt=PROMPT, model=spec, policy=policy, density=density)
    a = attribute(m, run, method="ig", steps=50)
    fx_dense, fx_sparse = _f_input(m, run, a.target)
    assert a.f_dense[0] == pytest.approx(fx_dense, abs=1e-4)
    assert a.f_sparse[0] == pytest.approx(fx_sparse, abs=1e-4)
    for attrs, (fx, fb), delta in ((a.dense, a.f_dense, a.delta_dense), (a.sparse, a.f_sparse, a.delta_sparse)):
        gap = fx - fb
        assert abs(sum(attrs) - gap) <= abs(delta) + 1e-5          # completeness, within the reported delta
        assert abs(delta) <= 0.02 * abs(gap) + 1e-5                # and 50 steps are enough to converge
    assert len(a.dense) == len(a.sparse) == len(a.tokens)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-opt", "tiny-bert"])
@pytest.mark.parametrize("method", ["ig", "ixg"])
def test_density_one_gives_the_dense_attributions(spec, method):
    m = shared(spec)
    for policy in ("topk", "threshold"):
        a = attribute(m, RunSpec(prompt=HELD_OUT[0], model=spec, policy=policy, density=1.0), method=method,
                      steps=20)
        torch.testing.assert_close(torch.tensor(a.sparse), torch.tensor(a.dense), rtol=1e-5, atol=1e-5)
        assert a.mass_lost == [0.0] * m.n_layers
        assert all(int(k.min()) == len(a.tokens) for k in a.kept)      # every neuron kept for every token
        for nd, ns in zip(a.neurons_dense, a.neurons_sparse):
            torch.testing.assert_close(ns, nd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2", "minilm"])
def test_mass_lost_does_not_fall_as_topk_density_falls(spec):
    m = shared(spec)
    lost = [attribute(m, RunSpec(prompt=PROMPT, model=spec, policy="topk", density=d), method="ixg").mass_lost
            for d in (1.0, 0.75, 0.5, 0.25, 0.1)]
    assert lost[0] == [0.0] * m.n_layers
    first = [layer[0] for layer in lost]                  # layer 0 sees the same input at every density
    assert first == sorted(first)
    mean = [sum(layer) / len(layer) for layer in lost]
    assert mean == sorted(mean) and mean[-1] > 0.2


def _clean(m, before):
    """Exactly the hooks there were before the run (transformers installs its own output-capturing
    hooks once, on the first forward with output_hidden_states, and keeps them: not ours)."""
    assert hook_snapshot(m.model) == before
    assert hook_snapshot(m.model)[1] == (0,) * len(GLOBAL_HOOKS)
    assert current_run() is None


def test_no_hooks_left_after_attribution_or_an_error_inside_it():
    m = shared("tiny-llama")
    analyze(m, RunSpec(prompt=PROMPT, model="tiny-llama"))             # transformers' own hooks, once
    before = hook_snapshot(m.model)
    attribute(m, RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.5), steps=10)
    _clean(m, before)

    def exploding(x, idx, w):
        raise RuntimeError("raised inside the sparse MLP during attribution")

    KERNELS["exploding"] = exploding
    try:
        with pytest.raises(RuntimeError, match="during attribution"):
            attribute(m, RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.5,
                                 kernel="exploding"), steps=10)
    finally:
        del KERNELS["exploding"]
    _clean(m, before)
    assert sum(sum(c) for c in before[0].values()) == 4          # the 4 transformers hooks, nothing else


def test_cli_attribute_json(capsys):
    assert main(["attribute", "--model", "tiny-llama", "--prompt", PROMPT, "--policy", "threshold",
                 "--density", "0.3", "--steps", "30", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"tokens", "dense", "sparse", "delta_dense", "delta_sparse", "mass_lost", "noise", "layers"} <= set(out)
    assert len(out["dense"]) == len(out["sparse"]) == len(out["tokens"])
    assert len(out["mass_lost"]) == 2
    assert [set(layer) for layer in out["layers"]] == [{"layer", "mass_lost", "neuron_l1_dense", "neuron_l1_sparse",
                                                        "noise_dense", "noise_sparse"}] * 2


def _hand_neuron_l1(m, spec: RunSpec, target: dict, sparse: bool) -> list[float]:
    """Per layer, sum over tokens and neurons of |h * df/dh|, by hand: autograd on the activations h
    entering each down projection (the original modules, outside any sparse run); for the sparse
    model, h is masked to each token's top k = round(density * d_ff) neurons by |h| at every layer."""
    enc = m.encode(spec.prompt)
    k, hs = round(spec.density * m.d_ff), []
    if target["kind"] == "cosine":
        with torch.no_grad():
            query = _pool(m.model(**m.encode(target["query"])))

    def capture(module, inputs):
        h = inputs[0]                                                   # [1, T, d_ff]
        if sparse:
            h = h * torch.zeros_like(h).scatter(-1, h.abs().topk(k, dim=-1).indices, 1.0)
        h.retain_grad()
        hs.append(h)
        return (h,)

    handles = [mlp.resolve(m.adapter.down).register_forward_pre_hook(capture) for mlp in install(m)]
    try:
        emb = m.model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_()
        out = m.model(inputs_embeds=emb, attention_mask=enc["attention_mask"])
        f = out.logits[0, -1, target["id"]] if target["kind"] == "logit" else _pool(out) @ query
        f.backward()
    finally:
        for handle in handles:
            handle.remove()
    return [float((h.detach() * h.grad).abs().sum()) for h in hs]


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-bert"])
def test_cli_neuron_l1_norms_equal_gradient_x_activation_by_hand(spec, capsys):
    assert main(["attribute", "--model", spec, "--prompt", PROMPT, "--policy", "topk", "--density", "0.25",
                 "--method", "ixg", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    run = RunSpec(prompt=PROMPT, model=spec, policy="topk", density=0.25)
    for name, sparse in (("neuron_l1_dense", False), ("neuron_l1_sparse", True)):
        by_hand = _hand_neuron_l1(shared(spec), run, out["target"], sparse)
        assert [layer[name] for layer in out["layers"]] == pytest.approx(by_hand, rel=1e-4)
        assert min(by_hand) > 0


def test_default_query_is_the_first_of_several_sentences_else_a_fixed_question():
    assert default_query("Cats purr. Dogs bark!") == "Cats purr."
    assert default_query(PROMPT) == FALLBACK_QUERY
    assert default_query("x" * 3000 + ". Second one.") == FALLBACK_QUERY


@pytest.fixture(scope="module")
def minilm_targets():
    """minilm with the default query, and with the prompt as its own query (the old target: the
    cosine is at its maximum at the input, so the dense gradient there is zero)."""
    m, run = shared("minilm"), RunSpec(prompt=PROMPT, model="minilm", policy="topk", density=0.5)
    return attribute(m, run, method="ixg"), attribute(m, run, method="ixg", query=PROMPT)


def test_minilm_default_query_is_far_above_rounding_noise(minilm_targets):
    a, at_maximum = minilm_targets
    assert a.target == {"kind": "cosine", "query": FALLBACK_QUERY}
    assert a.token_noise == (False, False) and a.neuron_noise == [(False, False)] * 6
    floor = math.sqrt(len(a.tokens) * 1536) * EPS32 * max(map(abs, a.f_dense))
    for dense, sparse, noise in zip(a.neuron_l1_dense, a.neuron_l1_sparse, at_maximum.neuron_l1_dense):
        assert dense > 1e3 * noise and dense > 1e3 * floor         # float32 noise, measured and bounded
        assert 0.1 < dense / sparse < 10                          # comparable with the sparse model's
    assert all(isinstance(x, float) and 0 < x < 1 for x in a.mass_lost)


def test_a_target_with_zero_gradient_is_flagged_as_noise(minilm_targets):
    _, a = minilm_targets
    assert a.f_dense[0] == pytest.approx(1.0, abs=1e-6)            # cosine to itself: the maximum
    assert a.token_noise == (True, False)                          # the sparse cosine is below 1: a gradient
    assert a.neuron_noise == [(True, False)] * 6
    assert a.mass_lost == [None] * 6
    assert a.to_json()["mass_lost"] == [None] * 6


def test_cli_attribute_json_gives_null_mass_lost_for_noise(capsys):
    assert main(["attribute", "--model", "tiny-bert", "--prompt", PROMPT, "--query", PROMPT, "--method", "ixg",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == {"kind": "cosine", "query": PROMPT}
    assert out["mass_lost"] == [None, None] and [layer["mass_lost"] for layer in out["layers"]] == [None, None]
    assert [(layer["noise_dense"], layer["noise_sparse"]) for layer in out["layers"]] == [(True, False)] * 2
    assert out["noise"]["tokens_dense"] is True and out["noise"]["tokens_sparse"] is False


@pytest.mark.parametrize("args", [["--density", "abc"], ["--policy", "nope"], ["--model", "/etc"],
                                  ["--steps", "0"], ["--steps", "x"], ["--method", "shap"],
                                  ["--model", "tiny-llama", "--target", "two words"], ["--prompt", ""],
                                  ["--model", "tiny-llama", "--query", "a question"],
                                  ["--model", "tiny-bert", "--target", "a"], ["--model", "tiny-bert", "--query", " "],
                                  ["--model", "tiny-bert", "--query", "x" * 3000]])
def test_cli_attribute_bad_input(args, capsys):
    assert main(["attribute", "--prompt", PROMPT, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_selection_is_frozen_along_the_integration_path():
    """The documented choice: at any point of the path (here the baseline itself), each token keeps
    the neurons the sparse model chose on the real input; without freezing, the choice would move."""
    from sam_viz.attribution import _baseline
    from sam_viz.sparse_ops import Policy, Recorder

    m = shared("tiny-llama")
    enc = m.encode(PROMPT)
    n = enc["input_ids"].shape[1]
    on_input = Recorder()
    with torch.no_grad(), sparsified(m, Policy("topk", 0.25), recorder=on_input):
        m.model(**enc)
    chosen = on_input.layers(n, m.d_ff)
    frozen = {i: lf.padded_ids() for i, lf in enumerate(chosen)}
    base = _baseline(m, enc["input_ids"])
    on_path, free = Recorder(), Recorder()
    with torch.no_grad():
        with sparsified(m, Policy("topk", 0.25), frozen=frozen, recorder=on_path):
            m.model(input_ids=base, attention_mask=enc["attention_mask"])
        with sparsified(m, Policy("topk", 0.25), recorder=free):
            m.model(input_ids=base, attention_mask=enc["attention_mask"])
    for a, b, c in zip(chosen, on_path.layers(n, m.d_ff), free.layers(n, m.d_ff)):
        assert torch.equal(a.ids, b.ids)
        assert not torch.equal(a.ids, c.ids)


def test_a_delta_below_float32_resolution_is_shown_as_below_it():
    """float32's spacing at |f| = 0.2445 (in [2^-3, 2^-2)) is 2^-3 * 2^-23; a delta of 0 (the sum and the
    change of f equal in float32: minilm's sparse IG on the app's default prompt) reads as below it."""
    from types import SimpleNamespace

    from sam_viz.attribution import Attribution, delta_text

    a = SimpleNamespace(f_dense=(0.0759, 0.2058), f_sparse=(0.0546, -0.2445))
    res = Attribution.delta_resolution.fget(a)
    assert res == (2.0 ** -26, 2.0 ** -26)
    assert delta_text(0.0, 2.0 ** -26) == "< 1.5e-08"
    assert delta_text(-1e-8, 2.0 ** -26) == "< 1.5e-08"
    assert delta_text(2.98e-06, 2.0 ** -26) == "2.98e-06"
