"""The `triton` backend against `reference` (masked dense): fp32 (rel 1e-5) and bf16 / fp16 weights
(rel 1e-2), every activation, GLU or not, biases or not, k = 1 and k = d_ff, -1 padding, widths that
are no block multiple, split slots; torch.compile without graph breaks; clear errors; whole models.
On a GPU it runs the compiled kernels on CUDA tensors; without one, Triton's interpreter on the CPU."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"      # before the kernels are decorated (conftest does it too)

import pytest  # noqa: E402

import sam_viz.sparse_ops.triton_kernel as tk  # noqa: E402
from conftest import HELD_OUT, model_output, shared  # noqa: E402
from sam_viz.models import InputError, MLPWeights  # noqa: E402
from sam_viz.sparse_ops import Policy, get_kernel, reference, sparsified  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTS = {"silu": torch.nn.SiLU(), "gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU(approximate="tanh"),
        "relu": torch.nn.ReLU()}


def _weights(d, d_ff, d_out, glu, bias, act, gen, dtype=torch.float32):
    r = lambda *s: torch.randn(*s, generator=gen).to(DEVICE)  # noqa: E731
    return MLPWeights(gate=r(d_ff, d).to(dtype), up=r(d_ff, d).to(dtype) if glu else None,
                      down_t=r(d_ff, d_out).to(dtype), act=act, b_gate=r(d_ff) if bias else None,
                      b_up=r(d_ff) if bias and glu else None, b_down=r(d_out) if bias else None)


def _indices(n, d_ff, k, gen):
    """Unsorted duplicate-free sets; token 1 padded with -1 at random slots, the last token all -1."""
    idx = torch.stack([torch.randperm(d_ff, generator=gen)[:k] for _ in range(n)])
    if k > 1:
        idx[1, torch.randperm(k, generator=gen)[: k // 2]] = -1
    idx[-1] = -1
    return idx.to(DEVICE)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _in_fp32(w):
    """The same (rounded) weights, for the reference to compute in fp32."""
    f = lambda t: None if t is None else t.float()  # noqa: E731
    return MLPWeights(gate=f(w.gate), up=f(w.up), down_t=f(w.down_t), act=w.act, b_gate=w.b_gate,
                      b_up=w.b_up, b_down=w.b_down)


SHAPES = [(7, 13, 5, 1), (33, 65, 33, 65), (70, 200, 45, 37), (300, 96, 290, 50)]   # d, d_ff, d_out, k


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("d,d_ff,d_out,k", SHAPES)
@pytest.mark.parametrize("glu,bias", [(True, False), (False, True), (True, True)])
def test_fp32_matches_reference(act, d, d_ff, d_out, k, glu, bias):
    gen = torch.Generator().manual_seed(d * 7 + d_ff + k + len(act))
    w = _weights(d, d_ff, d_out, glu, bias, ACTS[act], gen)
    x = torch.randn(4, d, generator=gen).to(DEVICE)
    idx = _indices(4, d_ff, k, gen)
    y, h = tk.triton_kernel(x, idx, w)
    y_ref, h_ref = reference(x, idx, w)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape and y.device == x.device
    assert _rel(y, y_ref) <= 1e-5 and _rel(h, h_ref) <= 1e-5
    assert torch.all(h[idx < 0] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("glu", [True, False])
@pytest.mark.parametrize("density", [0.05, 0.5, 1.0])
def test_half_weights_accumulate_in_fp32(dtype, glu, density):
    gen = torch.Generator().manual_seed(int(density * 100) + glu)
    d, d_ff = 96, 260
    w = _weights(d, d_ff, d, glu, True, ACTS["silu"], gen, dtype)
    x = torch.randn(2, d, generator=gen).to(DEVICE)
    k = max(1, round(density * d_ff))
    idx = torch.stack([torch.randperm(d_ff, generator=gen)[:k] for _ in range(2)]).to(DEVICE)
    y, h = tk.triton_kernel(x, idx, w)
    y_ref, h_ref = reference(x, idx, _in_fp32(w))
    assert _rel(y, y_ref) <= 1e-2 and _rel(h, h_ref) <= 1e-2


def test_many_programs_and_split_slots_are_deterministic(monkeypatch):
    """The GPU's launch shape (small slot blocks, the down projection split over slots) on any device."""
    monkeypatch.setattr(tk, "_target_programs", lambda device: 64)
    gen = torch.Generator().manual_seed(3)
    w = _weights(40, 200, 260, True, True, ACTS["gelu"], gen)
    x = torch.randn(2, 40, generator=gen).to(DEVICE)
    idx = _indices(2, 200, 96, gen)
    y, h = tk.triton_kernel(x, idx, w)
    y_ref, h_ref = reference(x, idx, w)
    assert _rel(y, y_ref) <= 1e-5 and _rel(h, h_ref) <= 1e-5
    assert torch.equal(tk.triton_kernel(x, idx, w)[0], y)


def test_rows_are_prepared_once_and_contiguous_weights_are_not_copied():
    gen = torch.Generator().manual_seed(4)
    w = _weights(16, 32, 8, True, False, ACTS["silu"], gen)
    down = w.down_t.t().contiguous().t()                                # a transposed view, as models hold it
    device = w.gate.device
    assert tk._rows(down, torch.float32, device) is tk._rows(down, torch.float32, device)
    assert tk._rows(w.gate, torch.float32, device).data_ptr() == w.gate.data_ptr()


def test_weights_as_models_hold_them():
    """Transposed views (W_down^T; GPT-2's Conv1D) and CPU tensors: on a GPU the rows are copied
    there once, and y and h come back on x's device."""
    gen = torch.Generator().manual_seed(6)
    w = _weights(24, 50, 30, False, True, ACTS["gelu_tanh"], gen)
    w = MLPWeights(gate=w.gate.t().contiguous().t().cpu(), up=None, down_t=w.down_t.t().contiguous().t().cpu(),
                   act=w.act, b_gate=w.b_gate.cpu(), b_down=w.b_down.cpu())
    x = torch.randn(3, 24, generator=gen)
    idx = _indices(3, 50, 20, gen).cpu()
    y, h = get_kernel("triton")(x, idx, w)
    y_ref, h_ref = reference(x, idx, w)
    assert y.device == x.device and _rel(y, y_ref) <= 1e-5 and _rel(h, h_ref) <= 1e-5


def test_compiles_without_graph_breaks():
    gen = torch.Generator().manual_seed(5)
    w = _weights(24, 64, 20, True, True, ACTS["silu"], gen)
    x = torch.randn(3, 24, generator=gen).to(DEVICE)
    idx = _indices(3, 64, 16, gen)

    def fn(x, idx):
        y, h = torch.ops.sam_viz.sparse_mlp_triton(x * 2, idx, w.gate, w.up, w.down_t, w.b_gate, w.b_up,
                                                   w.b_down, 0)
        return y + 1, h

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, idx)
    y_ref, h_ref = reference(x * 2, idx, w)
    assert _rel(compiled[0], y_ref + 1) <= 1e-5 and _rel(compiled[1], h_ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clamped_swiglu_matches_its_equation(dtype):
    """gpt-oss's activation: g = min(x.gate_j + b, limit), u = clamp(x.up_j + b, +-limit) + 1,
    h_j = g sigmoid(alpha g) u, written out here; the clamps are hit on both sides."""
    from sam_viz.models.adapters import ClampedShift, ClampedSwish

    gen = torch.Generator().manual_seed(8)
    limit, alpha = 2.5, 1.702
    w = _weights(40, 70, 33, True, True, ClampedSwish(limit, alpha), gen, dtype)
    w = MLPWeights(gate=w.gate, up=w.up, down_t=w.down_t, act=w.act, b_gate=w.b_gate, b_up=w.b_up, b_down=w.b_down,
                   up_act=ClampedShift(limit))
    x = torch.randn(3, 40, generator=gen).to(DEVICE) * 0.5
    idx = _indices(3, 70, 30, gen)
    f = _in_fp32(w)
    pre_g = (x @ f.gate.t() + w.b_gate).min(torch.tensor(limit, device=DEVICE))
    pre_u = x @ f.up.t() + w.b_up
    assert (pre_u > limit).any() and (pre_u < -limit).any() and (pre_g == limit).any()
    h_all = pre_g * torch.sigmoid(alpha * pre_g) * (pre_u.clamp(-limit, limit) + 1)
    mask = torch.zeros_like(h_all)
    for n, row in enumerate(idx.tolist()):
        mask[n, [j for j in row if j >= 0]] = 1
    y, h = tk.triton_kernel(x, idx, w)
    assert _rel(y, (h_all * mask) @ f.down_t + w.b_down) <= 1e-5
    assert _rel(h, torch.gather(h_all, 1, idx.clamp(min=0)) * (idx >= 0)) <= 1e-5


def test_clear_errors(monkeypatch):
    w = MLPWeights(gate=torch.randn(8, 4), up=None, down_t=torch.randn(8, 4), act=torch.nn.Tanh())
    x, idx = torch.randn(1, 4), torch.tensor([[0, 3]])
    with pytest.raises(InputError, match="does not implement the activation Tanh"):
        tk.triton_kernel(x.to(DEVICE), idx.to(DEVICE), MLPWeights(
            gate=w.gate.to(DEVICE), up=None, down_t=w.down_t.to(DEVICE), act=w.act))
    monkeypatch.setattr(tk, "interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match=r"^the triton kernel needs a CUDA GPU \(or TRITON_INTERPRET=1"):
        get_kernel("triton")(x, idx, w)
    monkeypatch.setitem(__import__("sys").modules, "sam_viz.sparse_ops.triton_kernel", None)   # triton missing
    with pytest.raises(InputError, match="needs the triton package"):
        get_kernel("triton")(x, idx, w)


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_whole_model_equals_reference(spec):
    m = shared(spec)
    enc = m.encode(HELD_OUT[2])
    outs = {}
    for kernel in ("reference", "triton"):
        with torch.no_grad(), sparsified(m, Policy("topk", 0.25), kernel=kernel):
            outs[kernel] = model_output(m, enc)
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-4)
