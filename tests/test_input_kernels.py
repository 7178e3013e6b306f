"""The input kernels (a projection whose input is sparse) against the equation F.linear(x * mask, W, b)
with the mask written by hand from idx: every backend that runs here, fp32 (tight) and bf16 / fp16
weights (loose), with and without bias, widths that are no SIMD multiple, one token and several,
nothing selected (all -1), everything selected, -1 in the middle of a row; a Conv1D-style weight
handed over as a transposed view; the gradient when autograd needs one; clear refusals. Both cpu
builds (`native`, `portable`) are checked; triton in its interpreter on the CPU, small shapes."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"      # before the triton kernels are decorated (conftest does it too)

import pytest  # noqa: E402

from sam_viz.models import InputError  # noqa: E402
from sam_viz.sparse_ops import INPUT_KERNELS, ProjWeights, get_input_kernel  # noqa: E402
from sam_viz.sparse_ops.kernels import unavailable_kernels  # noqa: E402

BACKENDS = [b for b in sorted(INPUT_KERNELS) if b not in unavailable_kernels()]
DEVICE = {"triton": "cuda" if torch.cuda.is_available() else "cpu"}


def _by_hand(x, idx, weight, bias):
    """The equation in float64: mask[n, i] = 1 for each selected i of token n, then x * mask @ W^T + b."""
    mask = torch.zeros(x.shape, dtype=torch.float64)
    for n, row in enumerate(idx.tolist()):
        for i in row:
            if i >= 0:
                mask[n, i] = 1.0
    y = (x.double() * mask) @ weight.double().t()
    return y if bias is None else y + bias.double()


def _indices(n, d_in, k, gen, pad_middle=True):
    """Distinct channels per token; token 0 with a -1 in the middle of its row."""
    idx = torch.stack([torch.randperm(d_in, generator=gen)[:k] for _ in range(n)])
    if pad_middle and k > 2:
        idx[0, k // 2] = -1
    return idx


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp(min=1e-12))


def _run(backend, x, idx, p, variant=None):
    if backend == "cpu" and variant is not None:
        from sam_viz.sparse_ops.cpu import input_kernel
        return input_kernel(x, idx, p, variant)
    dev = DEVICE.get(backend, "cpu")
    y = INPUT_KERNELS[backend](x.to(dev), idx.to(dev), ProjWeights(p.weight.to(dev),
                                                                 None if p.bias is None else p.bias.to(dev)))
    assert y.device.type == dev and y.dtype == x.dtype
    return y.cpu()


def _cases(backend):
    """(backend, variant) pairs: both cpu builds."""
    return [(backend, v) for v in ("native", "portable")] if backend == "cpu" else [(backend, None)]


CASES = [c for b in BACKENDS for c in _cases(b)]
# n, d_in, d_out, k: widths off the 16 / 32 SIMD chunk, k = 1, k = d_in, d_out < one chunk; the last
# reads enough bytes (400 rows of 4 KB) for the cpu kernel to split the rows over two threads
SHAPES = [(1, 7, 5, 3), (1, 33, 65, 1), (3, 70, 45, 70), (2, 100, 77, 40), (4, 64, 96, 17), (1, 129, 31, 64),
          (2, 700, 1000, 400)]


@pytest.mark.parametrize("backend,variant", CASES)
@pytest.mark.parametrize("n,d_in,d_out,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_equals_masked_linear(backend, variant, n, d_in, d_out, k, bias):
    gen = torch.Generator().manual_seed(n * 1000 + d_in * 10 + k + bias)
    weight, b = torch.randn(d_out, d_in, generator=gen), torch.randn(d_out, generator=gen) if bias else None
    x = torch.randn(n, d_in, generator=gen)
    idx = _indices(n, d_in, k, gen)
    y = _run(backend, x, idx, ProjWeights(weight, b), variant)
    assert y.shape == (n, d_out) and _rel(y, _by_hand(x, idx, weight, b)) <= 1e-5


@pytest.mark.parametrize("backend,variant", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d_in,d_out,k", [(1, 96, 70, 30), (3, 50, 130, 50), (2, 300, 40, 120), (1, 600, 1030, 300)])
def test_half_weights_accumulate_in_fp32(backend, variant, dtype, n, d_in, d_out, k):
    gen = torch.Generator().manual_seed(d_in + d_out + k)
    weight, b = torch.randn(d_out, d_in, generator=gen).to(dtype), torch.randn(d_out, generator=gen).to(dtype)
    x = torch.randn(n, d_in, generator=gen)
    idx = _indices(n, d_in, k, gen)
    y16 = _run(backend, x.to(dtype), idx, ProjWeights(weight, b), variant)   # x in the model's dtype
    assert y16.dtype == dtype and _rel(y16.float(), _by_hand(x.to(dtype), idx, weight, b)) <= 2e-2
    if backend != "reference":                                       # F.linear wants one dtype; these take fp32 x
        y = _run(backend, x, idx, ProjWeights(weight, b), variant)
        assert _rel(y, _by_hand(x, idx, weight, b)) <= 1e-2           # the rounded weights, summed in fp32


@pytest.mark.parametrize("backend,variant", CASES)
def test_nothing_selected_gives_the_bias_and_padding_anywhere_is_skipped(backend, variant):
    gen = torch.Generator().manual_seed(2)
    weight, b = torch.randn(20, 40, generator=gen), torch.randn(20, generator=gen)
    x = torch.randn(3, 40, generator=gen)
    none = torch.full((3, 5), -1)
    assert torch.equal(_run(backend, x, none, ProjWeights(weight, b), variant), b.expand(3, 20))
    assert torch.equal(_run(backend, x, none, ProjWeights(weight), variant), torch.zeros(3, 20))
    assert torch.equal(_run(backend, x, torch.empty(3, 0, dtype=torch.long), ProjWeights(weight), variant),
                       torch.zeros(3, 20))
    idx = torch.tensor([[-1, 3, -1, 0, 39], [39, -1, -1, -1, -1], [7, 8, 9, 10, -1]])
    assert _rel(_run(backend, x, idx, ProjWeights(weight, b), variant), _by_hand(x, idx, weight, b)) <= 1e-6


@pytest.mark.parametrize("backend,variant", CASES)
def test_conv1d_weight_as_a_transposed_view(backend, variant):
    """GPT-2's Conv1D stores [in, out]: the caller passes weight.t(), a non-contiguous view."""
    gen = torch.Generator().manual_seed(3)
    stored = torch.nn.Parameter(torch.randn(48, 36, generator=gen))          # [d_in, d_out]
    bias = torch.nn.Parameter(torch.randn(36, generator=gen))
    p = ProjWeights(stored.t(), bias)
    assert not p.weight.is_contiguous() and (p.d_in, p.d_out) == (48, 36)
    x = torch.randn(2, 48, generator=gen)
    idx = _indices(2, 48, 20, gen)
    with torch.no_grad():
        y = _run(backend, x, idx, p, variant)
    assert _rel(y, _by_hand(x, idx, stored.detach().t(), bias.detach())) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_the_equations(backend):
    """When autograd needs a backward (x or W requires grad), the compiled backends compute the
    reference equation: d(sum y)/dx and d(sum y)/dW equal the by-hand ones."""
    gen = torch.Generator().manual_seed(4)
    w0, b0 = torch.randn(10, 24, generator=gen), torch.randn(10, generator=gen)
    x0 = torch.randn(3, 24, generator=gen)
    idx = _indices(3, 24, 9, gen)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    INPUT_KERNELS[backend](x, idx, ProjWeights(w, b0)).sum().backward()
    xd, wd = x0.double().requires_grad_(), w0.double().requires_grad_()
    _by_hand(xd, idx, wd, b0).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-6, atol=1e-6)


def test_cpu_layout_is_prepared_once_and_freed_with_the_weight():
    import gc

    from sam_viz.sparse_ops import cpu

    if "cpu" not in BACKENDS:
        pytest.skip("the cpu kernel cannot be built here")
    before = len(cpu._PREPARED)
    stored = torch.randn(16, 24)                                 # Conv1D-style [in, out]: its own rows
    linear = torch.nn.Linear(16, 24)
    a, b = ProjWeights(stored.t()), ProjWeights(linear.weight, linear.bias)
    assert cpu.prepare_proj(a).wt.data_ptr() == stored.data_ptr()                  # no copy
    assert cpu.prepare_proj(b) is cpu.prepare_proj(b) and cpu.prepare_proj(b).wt.is_contiguous()
    assert len(cpu._PREPARED) == before + 2
    del a, b, stored, linear
    gc.collect()
    assert len(cpu._PREPARED) == before


def test_unknown_and_unavailable_backends_are_refused_in_one_sentence(monkeypatch):
    with pytest.raises(InputError, match=r"^unknown kernel 'warp'; available here: reference") as err:
        get_input_kernel("warp")
    assert len(str(err.value).splitlines()) == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match=r"^the triton kernel cannot run here: it needs a CUDA GPU") as err:
        get_input_kernel("triton")
    assert len(str(err.value).splitlines()) == 1
    from sam_viz.sparse_ops import cpu

    monkeypatch.setattr(cpu, "readiness", lambda: ("unavailable", "it needs a C++ compiler to build"))
    with pytest.raises(InputError, match=r"^the cpu kernel cannot run here: it needs a C\+\+ compiler to build$"):
        get_input_kernel("cpu")
    assert get_input_kernel("reference") is INPUT_KERNELS["reference"]


def test_weights_of_the_wrong_shape_are_refused_where_they_are_built():
    with pytest.raises(ValueError, match=r"weight \[d_out, d_in\] and bias \[d_out\], not \(4, 8\) and \(8,\)"):
        ProjWeights(torch.randn(4, 8), torch.randn(8))
    with pytest.raises(ValueError, match=r"not \(8,\) and None"):
        ProjWeights(torch.randn(8))


def test_out_of_range_channels_are_refused_not_read():
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu kernel cannot be built here")
    with pytest.raises(RuntimeError, match="idx out of range"):
        INPUT_KERNELS["cpu"](torch.randn(1, 8), torch.tensor([[8]]), ProjWeights(torch.randn(4, 8)))


def test_bench_input_rows_on_a_toy_shape(monkeypatch):
    """`bench kernels --input` end to end on a toy shape (no timing asserted): one row per shape,
    dtype and density, finite times, the floor's bytes = the selected rows of W^T."""
    if "cpu" not in BACKENDS:
        pytest.skip("the cpu kernel cannot be built here")
    import math

    from sam_viz.benchmarks import input_kernels

    monkeypatch.setattr(input_kernels, "ROTATE_BYTES", 2**16)
    rows = input_kernels.run(shapes={"toy": (40, 64)}, densities=(0.25, 0.5), calls=2)
    assert [(r["dtype"], r["density"]) for r in rows] == [("fp32", 0.25), ("fp32", 0.5), ("bf16", 0.25), ("bf16", 0.5)]
    assert all(math.isfinite(r[f]) and r[f] > 0 for r in rows for f in ("ms", "dense_ms", "floor_ms"))
    assert rows[0]["floor_gb_s"] == pytest.approx(16 * 40 * 4 / 1e9 / rows[0]["floor_ms"] * 1e3)
    assert len(input_kernels.report(rows, 2)) == 2 + len(rows)
