"""The compiled `cpu` backend against `reference` and the equation: fp32 (rel 1e-5) and bf16
weights (rel 1e-2), every activation, k = 1 and k = d_ff, widths that are not a SIMD multiple,
tokens sharing one index set, and whole models."""
import pytest
import torch

from conftest import HELD_OUT, shared
from models import MLPWeights
from sam_viz import RunSpec, analyze
from sparse_ops import reference
from sparse_ops.cpu import ACTIVATIONS, activation_code, cpu_kernel, prepare, sparse_mlp_shared

ACT_MODULES = {0: torch.nn.SiLU(), 1: torch.nn.GELU(), 2: torch.nn.GELU(approximate="tanh"), 3: torch.nn.ReLU()}


def _weights(d, d_ff, glu, bias, act, gen, d_out=None):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return MLPWeights(gate=r(d_ff, d), up=r(d_ff, d) if glu else None, down_t=r(d_ff, d_out or d), act=act,
                      b_gate=r(d_ff) if bias else None, b_up=r(d_ff) if bias and glu else None,
                      b_down=r(d_out or d) if bias else None)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.mark.parametrize("act", list(ACT_MODULES))
@pytest.mark.parametrize("d,d_ff,k", [(1, 1, 1), (7, 13, 1), (33, 65, 65), (64, 256, 17), (129, 300, 150),
                                      (512, 1376, 138)])
@pytest.mark.parametrize("glu,bias", [(True, False), (False, True)])
def test_fp32_matches_reference(act, d, d_ff, k, glu, bias):
    gen = torch.Generator().manual_seed(d * 7 + d_ff + k + act)
    w = _weights(d, d_ff, glu, bias, ACT_MODULES[act], gen)
    x = torch.randn(3, d, generator=gen)
    idx = torch.stack([torch.randperm(d_ff, generator=gen)[:k] for _ in range(3)])
    y, h = cpu_kernel(x, idx, w)
    y_ref, h_ref = reference(x, idx, w)
    assert _rel(y, y_ref) <= 1e-5 and _rel(h, h_ref) <= 1e-5


@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("density", [0.05, 0.1, 0.5, 1.0])
def test_bf16_weights_accumulate_in_fp32(glu, density):
    gen = torch.Generator().manual_seed(int(density * 100))
    d, d_ff = 256, 688
    w = _weights(d, d_ff, glu, False, torch.nn.SiLU(), gen)
    w16 = MLPWeights(gate=w.gate.bfloat16(), up=None if w.up is None else w.up.bfloat16(),
                     down_t=w.down_t.bfloat16(), act=w.act)
    x = torch.randn(1, d, generator=gen)
    idx = torch.randperm(d_ff, generator=gen)[: max(1, round(density * d_ff))][None]
    y, _ = cpu_kernel(x, idx, w16)
    ref = MLPWeights(gate=w16.gate.float(), up=None if w.up is None else w16.up.float(),
                     down_t=w16.down_t.float(), act=w.act)          # the bf16 weights, in fp32 arithmetic
    assert _rel(y, reference(x, idx, ref)[0]) <= 1e-2
    assert _rel(y, reference(x, idx, w)[0]) <= 1e-2                # and close to the fp32 weights too


def test_tokens_sharing_one_index_set():
    """The Deja Vu batch: several tokens, the union of their sets, one pass over the rows."""
    gen = torch.Generator().manual_seed(5)
    w = _weights(48, 200, True, True, torch.nn.SiLU(), gen)
    x = torch.randn(4, 48, generator=gen)
    union = torch.randperm(200, generator=gen)[:60]
    y, h = sparse_mlp_shared(x, union, prepare(w))
    y_ref, h_ref = reference(x, union.expand(4, 60), w)
    assert _rel(y, y_ref) <= 1e-5 and _rel(h, h_ref) <= 1e-5


def test_padding_slots_are_skipped_and_layout_is_prepared_once():
    gen = torch.Generator().manual_seed(9)
    w = _weights(20, 40, True, False, torch.nn.SiLU(), gen)
    idx = torch.tensor([[3, 0, -1, -1], [0, 1, 2, 39]])
    x = torch.randn(2, 20, generator=gen)
    y, h = cpu_kernel(x, idx, w)
    y_ref, h_ref = reference(x, idx, w)
    assert _rel(y, y_ref) <= 1e-5 and torch.equal(h[0, 2:], torch.zeros(2))
    assert prepare(w) is prepare(w)


def test_activation_is_identified_by_value():
    for code, module in ACT_MODULES.items():
        assert activation_code(module) == code
    assert set(ACTIVATIONS) == set(ACT_MODULES)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-opt", "tiny-mixtral"])
@pytest.mark.parametrize("policy", ["topk", "threshold"])
def test_whole_model_cpu_equals_reference(spec, policy):
    m = shared(spec)
    ref = analyze(m, RunSpec(prompt=HELD_OUT[1], model=spec, policy=policy, density=0.3))
    cpu = analyze(m, RunSpec(prompt=HELD_OUT[1], model=spec, policy=policy, density=0.3, kernel="cpu"))
    for a, b in zip(ref.layers, cpu.layers):
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(b.values.float(), a.values.float(), rtol=1e-3, atol=1e-4)
    assert cpu.compare["max_abs_diff"] == pytest.approx(ref.compare["max_abs_diff"], rel=1e-3, abs=1e-5)
