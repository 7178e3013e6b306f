"""Every kernel backend against the equation y = sum_{j in S} h_j W_down^T[j] + b, on random shapes."""
import pytest
import torch

from models import MLPWeights
from sparse_ops import KERNELS, topk_indices


def _weights(d, d_ff, glu, bias, gen):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return MLPWeights(gate=r(d_ff, d), up=r(d_ff, d) if glu else None, down_t=r(d_ff, d),
                      act=torch.nn.SiLU() if glu else torch.nn.GELU(),
                      b_gate=r(d_ff) if bias else None, b_up=r(d_ff) if bias and glu else None,
                      b_down=r(d) if bias else None)


def _by_equation(x, idx, w):
    y = torch.zeros(x.shape[0], w.down_t.shape[1], dtype=torch.float64)
    hs = torch.zeros(idx.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for slot, j in enumerate(idx[n].tolist()):
            if j < 0:
                continue
            pre = w.gate[j].double() @ x[n].double() + (w.b_gate[j].double() if w.b_gate is not None else 0)
            h = w.act(pre)
            if w.up is not None:
                h = h * (w.up[j].double() @ x[n].double() + (w.b_up[j].double() if w.b_up is not None else 0))
            hs[n, slot] = h
            y[n] += h * w.down_t[j].double()
        if w.b_down is not None:
            y[n] += w.b_down.double()
    return y, hs


SHAPES = [(1, 8, 16, 1), (3, 17, 33, 5), (4, 32, 64, 64), (2, 13, 7, 7), (5, 64, 96, 10)]


@pytest.mark.parametrize("backend", sorted(KERNELS))
@pytest.mark.parametrize("n,d,d_ff,k", SHAPES)
@pytest.mark.parametrize("glu,bias", [(True, False), (False, True), (True, True)])
def test_kernel_matches_equation(backend, n, d, d_ff, k, glu, bias):
    gen = torch.Generator().manual_seed(n * 1000 + d * 10 + k)
    w = _weights(d, d_ff, glu, bias, gen)
    x = torch.randn(n, d, generator=gen)
    idx = torch.stack([torch.randperm(d_ff, generator=gen)[:k] for _ in range(n)])
    if k > 1:
        idx[0, -1] = -1                                   # padding slot: no neuron
    y, h = KERNELS[backend](x, idx, w)
    y_ref, h_ref = _by_equation(x, idx, w)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)


def test_topk_ties_go_to_the_lower_index():
    h = torch.tensor([[1.0, -3.0, 3.0, 2.0, -3.0, 0.5]])
    assert topk_indices(h, 3).tolist() == [[1, 2, 4]]
    assert topk_indices(h, 2).tolist() == [[1, 2]]
