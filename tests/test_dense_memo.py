"""A rerun that changes only the density or policy reuses its prompt's dense pass (the app's density
slider: the dense side is the same), and never a stale one: weights changed in place or replaced run
the dense model again, checked against the model's own forward computed here."""
import torch

from sam_viz.models import load_model
from sam_viz import RunSpec, analyze
from sam_viz.analysis import forward, encode_prompt

PROMPT = "The keeper counted the ships. The storm went on all night."


def test_a_density_change_reuses_the_dense_pass_and_matches_a_fresh_model():
    loaded = load_model("tiny-llama")
    first = analyze(loaded, RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.5))
    second = analyze(loaded, RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.3))
    assert second.dense_layers[0] is first.dense_layers[0]              # not computed again
    fresh = analyze(load_model("tiny-llama"), second.spec)               # a model object of its own
    assert second.compare == fresh.compare and second.next_tokens == fresh.next_tokens
    for a, b in zip(second.dense_layers, fresh.dense_layers):
        assert torch.equal(a.activations, b.activations)


def top_prob(loaded) -> float:
    """The dense model's most likely next token's probability, from a forward pass run here."""
    return forward(loaded, encode_prompt(loaded, PROMPT)).logits[0, -1].double().softmax(-1).max().item()


def test_weights_changed_in_place_or_replaced_run_the_dense_model_again():
    loaded = load_model("tiny-llama")
    spec = RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.5)
    before = analyze(loaded, spec)
    lm_head = loaded.model.lm_head
    with torch.no_grad():
        lm_head.weight.mul_(2.0)                                          # in place
    changed = analyze(loaded, spec)
    assert abs(changed.next_tokens["dense"][0]["prob"] - top_prob(loaded)) < 1e-12
    assert abs(changed.next_tokens["dense"][0]["prob"] - before.next_tokens["dense"][0]["prob"]) > 1e-9
    lm_head.weight = torch.nn.Parameter(lm_head.weight.detach() / 4)      # replaced
    replaced = analyze(loaded, spec)
    assert abs(replaced.next_tokens["dense"][0]["prob"] - top_prob(loaded)) < 1e-12


def test_encoder_sentence_cosines_match_a_fresh_model_after_a_density_change():
    loaded = load_model("tiny-bert")
    analyze(loaded, RunSpec(prompt=PROMPT, model="tiny-bert", policy="topk", density=0.5))
    again = analyze(loaded, RunSpec(prompt=PROMPT, model="tiny-bert", policy="topk", density=0.3))
    fresh = analyze(load_model("tiny-bert"), again.spec)
    assert again.sentence_cosines == fresh.sentence_cosines and again.compare == fresh.compare


def test_a_dense_pass_over_the_memo_budget_is_not_kept(monkeypatch):
    from sam_viz import analysis
    monkeypatch.setattr(analysis, "DENSE_MEMO_BYTES", 1000)              # smaller than any pass of this prompt
    loaded = load_model("tiny-llama")
    first = analyze(loaded, RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.5))
    second = analyze(loaded, RunSpec(prompt=PROMPT, model="tiny-llama", policy="topk", density=0.3))
    assert second.dense_layers[0] is not first.dense_layers[0]
    assert torch.equal(second.dense_layers[0].activations, first.dense_layers[0].activations)
