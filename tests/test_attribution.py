"""Attribution through sparse MLPs (captum): completeness, density-1 equality, attribution mass
lost, and no hooks left behind (also after an error inside the computation)."""
import json

import pytest
import torch

from conftest import HELD_OUT, shared
from sam_viz import RunSpec, analyze
from sam_viz.attribution import attribute
from sam_viz.cli import main
from sparse_ops import KERNELS, current_run, sparsified
from test_isolation import GLOBAL_HOOKS, hook_snapshot

PROMPT = "The old sailor told stories about storms and distant harbours."


def _f_input(m, spec, target_id):
    """f(x) computed here: the target logit, or the embedding cosine to the dense embedding."""
    enc = m.encode(spec.prompt)
    with torch.no_grad():
        dense = m.model(**enc)
        with sparsified(m, spec.to_policy()):
            sparse = m.model(**enc)
    if m.kind == "causal-lm":
        return float(dense.logits[0, -1, target_id]), float(sparse.logits[0, -1, target_id])
    pool = lambda o: torch.nn.functional.normalize(o.last_hidden_state[0].mean(0), dim=0)  # noqa: E731
    return 1.0, float(pool(dense) @ pool(sparse))


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2", "minilm"])
@pytest.mark.parametrize("policy,density", [("topk", 0.3), ("threshold", 0.4)])
def test_integrated_gradients_are_complete(spec, policy, density):
    m = shared(spec)
    run = RunSpec(prompt=PROMPT, model=spec, policy=policy, density=density)
    a = attribute(m, run, method="ig", steps=50)
    fx_dense, fx_sparse = _f_input(m, run, a.target.get("id"))
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
    assert {"tokens", "dense", "sparse", "delta_dense", "delta_sparse", "mass_lost"} <= set(out)
    assert len(out["dense"]) == len(out["sparse"]) == len(out["tokens"])
    assert len(out["mass_lost"]) == 2


@pytest.mark.parametrize("args", [["--density", "abc"], ["--policy", "nope"], ["--model", "/etc"],
                                  ["--steps", "0"], ["--steps", "x"], ["--method", "shap"],
                                  ["--model", "tiny-llama", "--target", "two words"], ["--prompt", ""]])
def test_cli_attribute_bad_input(args, capsys):
    assert main(["attribute", "--prompt", PROMPT, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_selection_is_frozen_along_the_integration_path():
    """The documented choice: at any point of the path (here the baseline itself), each token keeps
    the neurons the sparse model chose on the real input; without freezing, the choice would move."""
    from sam_viz.attribution import _baseline
    from sparse_ops import Policy, Recorder

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
