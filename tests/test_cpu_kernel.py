"""The compiled `cpu` backend against `reference` and the equation: fp32 (rel 1e-5) and bf16
weights (rel 1e-2), every activation (gpt-oss's clamped SwiGLU against its equation), k = 1 and k = d_ff, widths that are not a SIMD multiple,
tokens sharing one index set, and whole models. Both builds are checked: `native` (the AVX-512
intrinsics where this CPU has AVX-512) and `portable` (built as for a machine without AVX-512)."""
import dataclasses
import math

import pytest
import torch

from conftest import HELD_OUT, shared
from sam_viz.models import MLPWeights
from sam_viz import RunSpec, analyze
from sam_viz.sparse_ops import reference
from sam_viz.sparse_ops.cpu import ACTIVATIONS, VARIANTS, activation_code, cpu_kernel, extension, prepare, sparse_mlp_shared

ACT_MODULES = {0: torch.nn.SiLU(), 1: torch.nn.GELU(), 2: torch.nn.GELU(approximate="tanh"), 3: torch.nn.ReLU()}


def _weights(d, d_ff, glu, bias, act, gen, d_out=None):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return MLPWeights(gate=r(d_ff, d), up=r(d_ff, d) if glu else None, down_t=r(d_ff, d_out or d), act=act,
                      b_gate=r(d_ff) if bias else None, b_up=r(d_ff) if bias and glu else None,
                      b_down=r(d_out or d) if bias else None)


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def test_native_build_uses_avx512_where_the_cpu_has_it():
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    has = " avx512f " in flags and " avx512bw " in flags
    assert extension("native").isa() == ("avx512" if has else "portable")
    assert extension("portable").isa() == "portable"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("act", list(ACT_MODULES))
@pytest.mark.parametrize("d,d_ff,k,d_out", [(1, 1, 1, None), (7, 13, 1, None), (33, 65, 65, None),
                                            (64, 256, 17, None), (129, 300, 150, None), (512, 1376, 138, None),
                                            (40, 90, 45, 72), (96, 50, 50, 17)])
@pytest.mark.parametrize("glu,bias", [(True, False), (False, True)])
def test_fp32_matches_reference(variant, act, d, d_ff, k, d_out, glu, bias):
    gen = torch.Generator().manual_seed(d * 7 + d_ff + k + act)
    w = _weights(d, d_ff, glu, bias, ACT_MODULES[act], gen, d_out=d_out)
    x = torch.randn(3, d, generator=gen)
    idx = torch.stack([torch.randperm(d_ff, generator=gen)[:k] for _ in range(3)])
    y, h = cpu_kernel(x, idx, w, variant)
    y_ref, h_ref = reference(x, idx, w)
    assert _rel(y, y_ref) <= 1e-5 and _rel(h, h_ref) <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("density", [0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("d,d_out", [(256, 256), (33, 33), (100, 61), (7, 200)])
def test_bf16_weights_accumulate_in_fp32(variant, glu, density, d, d_out):
    gen = torch.Generator().manual_seed(int(density * 100) + d)
    d_ff = 688
    w = _weights(d, d_ff, glu, False, torch.nn.SiLU(), gen, d_out=d_out)
    w16 = MLPWeights(gate=w.gate.bfloat16(), up=None if w.up is None else w.up.bfloat16(),
                     down_t=w.down_t.bfloat16(), act=w.act)
    x = torch.randn(2, d, generator=gen)
    idx = torch.stack([torch.randperm(d_ff, generator=gen)[: max(1, round(density * d_ff))] for _ in range(2)])
    y, h = cpu_kernel(x, idx, w16, variant)
    ref = MLPWeights(gate=w16.gate.float(), up=None if w.up is None else w16.up.float(),
                     down_t=w16.down_t.float(), act=w.act)          # the bf16 weights, in fp32 arithmetic
    assert _rel(y, reference(x, idx, ref)[0]) <= 1e-2 and _rel(h, reference(x, idx, ref)[1]) <= 1e-2
    assert _rel(y, reference(x, idx, w)[0]) <= 1e-2                # and close to the fp32 weights too


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,k", [(4, 48, 60), (3, 70, 1), (5, 64, 200), (1, 64, 37), (1, 96, 38), (1, 128, 2)])
def test_tokens_sharing_one_index_set(variant, dtype, n, d, k):
    """The Deja Vu batch: several tokens, the union of their sets, one pass over the rows."""
    gen = torch.Generator().manual_seed(5 + n + k)
    w = _weights(d, 200, True, True, torch.nn.SiLU(), gen)
    w = MLPWeights(gate=w.gate.to(dtype).float(), up=w.up.to(dtype).float(), down_t=w.down_t.to(dtype).float(),
                   act=w.act, b_gate=w.b_gate, b_up=w.b_up, b_down=w.b_down)   # exactly representable in dtype
    x = torch.randn(n, d, generator=gen)
    union = torch.randperm(200, generator=gen)[:k]
    union[k // 2] = -1                                             # a padding slot in the middle
    y, h = sparse_mlp_shared(x, union, prepare(w, dtype), variant)
    y_ref, h_ref = reference(x, union.expand(n, k), w)
    assert _rel(y, y_ref) <= 1e-5 and _rel(h, h_ref) <= 1e-5
    out = (torch.full((n, d), float("nan")), torch.full((n, k), float("nan")))   # into given buffers
    y2, h2 = sparse_mlp_shared(x, union, prepare(w, dtype), variant, out=out)
    assert y2 is out[0] and h2 is out[1] and _rel(y2, y_ref) <= 1e-5 and _rel(h2, h_ref) <= 1e-5


def test_output_buffers_of_the_wrong_shape_are_refused():
    w = _weights(8, 10, True, False, torch.nn.SiLU(), torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="y:"):
        sparse_mlp_shared(torch.randn(1, 8), torch.tensor([1, 2]), prepare(w), out=(torch.empty(1, 7), torch.empty(1, 2)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_slots_are_skipped_and_layout_is_prepared_once(variant):
    gen = torch.Generator().manual_seed(9)
    w = _weights(20, 40, True, False, torch.nn.SiLU(), gen)
    idx = torch.tensor([[3, 0, -1, -1], [0, 1, 2, 39]])
    x = torch.randn(2, 20, generator=gen)
    y, h = cpu_kernel(x, idx, w, variant)
    y_ref, h_ref = reference(x, idx, w)
    assert _rel(y, y_ref) <= 1e-5 and torch.equal(h[0, 2:], torch.zeros(2))
    assert prepare(w) is prepare(w)


def test_out_of_range_ids_are_refused_not_read():
    w = _weights(8, 10, True, False, torch.nn.SiLU(), torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="idx out of range"):
        cpu_kernel(torch.randn(1, 8), torch.tensor([[10]]), w)


def test_activation_is_identified_by_value():
    for code, module in ACT_MODULES.items():
        assert activation_code(module) == code
    assert set(ACTIVATIONS) == set(ACT_MODULES)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-opt", "tiny-mixtral"])
@pytest.mark.parametrize("policy", ["topk", "threshold"])
def test_whole_model_cpu_equals_reference(spec, policy):
    m = shared(spec)
    ref = analyze(m, RunSpec(prompt=HELD_OUT[1], model=spec, policy=policy, density=0.3, kernel="reference"))
    cpu = analyze(m, RunSpec(prompt=HELD_OUT[1], model=spec, policy=policy, density=0.3, kernel="cpu"))
    for a, b in zip(ref.layers, cpu.layers):
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(b.values.float(), a.values.float(), rtol=1e-3, atol=1e-4)
    assert cpu.compare["max_abs_diff"] == pytest.approx(ref.compare["max_abs_diff"], rel=1e-3, abs=1e-5)


def test_layout_cache_follows_the_weights_not_their_addresses():
    """Models built one after another often land at the addresses a freed one had: each must get its
    own layout (the cache once keyed by address handed a new model an old model's weights), and a
    freed model's layout must be dropped, not kept forever."""
    import gc

    from sam_viz.sparse_ops import cpu

    before = len(cpu._PREPARED)
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        w = _weights(64, 160, True, False, torch.nn.SiLU(), gen)
        x = torch.randn(2, 64, generator=gen)
        idx = torch.stack([torch.randperm(160, generator=gen)[:80] for _ in range(2)])
        assert _rel(cpu_kernel(x, idx, w)[0], reference(x, idx, w)[0]) <= 1e-5
        del w
        gc.collect()
        assert len(cpu._PREPARED) == before


def _clamped_by_equation(x, idx, w, limit, alpha):
    """gpt-oss's clamped SwiGLU, written out: g = min(x.gate_j + b, limit), u = clamp(x.up_j + b, +-limit) + 1,
    h_j = g sigmoid(alpha g) u; y = sum_j h_j down_j + b_down (float64)."""
    y = torch.zeros(x.shape[0], w.down_t.shape[1], dtype=torch.float64)
    hs = torch.zeros(idx.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for slot, j in enumerate(idx[n].tolist()):
            if j < 0:
                continue
            g = min(float(w.gate[j].double() @ x[n].double() + w.b_gate[j]), limit)
            u = min(max(float(w.up[j].double() @ x[n].double() + w.b_up[j]), -limit), limit) + 1.0
            hs[n, slot] = g / (1.0 + math.exp(-alpha * g)) * u
            y[n] += hs[n, slot] * w.down_t[j].double()
        y[n] += w.b_down.double()
    return y, hs


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,d_ff,k", [(33, 65, 20), (64, 128, 128), (70, 40, 1)])
def test_clamped_swiglu_matches_its_equation(variant, dtype, d, d_ff, k):
    """gpt-oss's activation, with limit and alpha as parameters; the clamps are hit on both sides
    (pre-activations of order sqrt(d) >> limit)."""
    from sam_viz.models.adapters import ClampedShift, ClampedSwish

    gen = torch.Generator().manual_seed(d + k)
    limit, alpha = 2.5, 1.702
    w = _weights(d, d_ff, True, True, ClampedSwish(limit, alpha), gen)
    w = MLPWeights(gate=w.gate.to(dtype).float(), up=w.up.to(dtype).float(), down_t=w.down_t.to(dtype).float(),
                   act=w.act, b_gate=w.b_gate, b_up=w.b_up, b_down=w.b_down, up_act=ClampedShift(limit))
    x = torch.randn(3, d, generator=gen) * 0.5
    idx = torch.stack([torch.randperm(d_ff, generator=gen)[:k] for _ in range(3)])
    if k > 2:
        idx[1, k // 2] = -1
    pre_gate, pre_up = x @ w.gate.t() + w.b_gate, x @ w.up.t() + w.b_up
    assert (pre_gate > limit).any() and (pre_up > limit).any() and (pre_up < -limit).any()
    half = dataclasses.replace(w, gate=w.gate.to(dtype), up=w.up.to(dtype), down_t=w.down_t.to(dtype))
    y, h = cpu_kernel(x, idx, half, variant)
    y_ref, h_ref = _clamped_by_equation(x, idx, w, limit, alpha)
    assert _rel(y.double(), y_ref) <= 1e-5 and _rel(h.double(), h_ref) <= 1e-5


def test_an_up_projection_transform_other_than_the_clamp_is_refused():
    from sam_viz.models import KernelCannotCompute
    from sam_viz.models.adapters import ClampedShift, ClampedSwish

    gen = torch.Generator().manual_seed(3)
    w = _weights(8, 10, True, False, ClampedSwish(3.0, 1.0), gen)
    for act, up_act in [(ClampedSwish(3.0, 1.0), torch.nn.Tanh()), (torch.nn.SiLU(), ClampedShift(3.0)),
                        (ClampedSwish(3.0, 1.0), ClampedShift(2.0))]:
        bad = MLPWeights(gate=w.gate.clone(), up=w.up.clone(), down_t=w.down_t.clone(), act=act, up_act=up_act)
        with pytest.raises(KernelCannotCompute, match=f"^the cpu kernel does not implement the activation "
                                                      f"{type(act).__name__} with {type(up_act).__name__}") as err:
            cpu_kernel(torch.randn(1, 8), torch.tensor([[1, 2]]), bad)
        assert len(str(err.value).splitlines()) == 1
