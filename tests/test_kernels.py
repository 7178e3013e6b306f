"""Every kernel backend against the equation y = sum_{j in S} h_j W_down^T[j] + b, on random shapes, and
its gradient; which kernels are offered on this machine, why the others are not, and the default."""
from pathlib import Path

import pytest
import torch

from sam_viz.models import InputError, MLPWeights
from sam_viz.sparse_ops import KERNELS, topk_indices


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


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compiled_kernels_pass_gradients_as_the_equation_does(backend):
    """Attribution differentiates through the sparse MLP: d(sum y)/dx must be the equation's."""
    gen = torch.Generator().manual_seed(7)
    w = _weights(12, 24, True, True, gen)
    x = torch.randn(3, 12, generator=gen)
    idx = torch.stack([torch.randperm(24, generator=gen)[:9] for _ in range(3)])
    xg = x.clone().requires_grad_()
    KERNELS[backend](xg, idx, w)[0].sum().backward()
    xd = x.double().requires_grad_()
    _by_equation(xd, idx, w)[0].sum().backward()
    torch.testing.assert_close(xg.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)


def test_kernels_offered_are_those_that_run_here(monkeypatch):
    from sam_viz import RunSpec
    from sam_viz.sparse_ops import cpu, default_kernel, get_kernel, unavailable_kernels
    from sam_viz.sparse_ops.kernels import available_kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" in available_kernels()                       # the interpreter runs it (as in CI)
    monkeypatch.delenv("TRITON_INTERPRET")
    why = unavailable_kernels()["triton"]
    assert "CUDA GPU" in why and "triton" not in available_kernels()
    for ask in (lambda: get_kernel("triton"), lambda: RunSpec(prompt="hi", kernel="triton")):
        with pytest.raises(InputError, match=r"^the triton kernel cannot run here: it needs a CUDA GPU") as err:
            ask()
        assert len(str(err.value).splitlines()) == 1
    with pytest.raises(InputError, match="^unknown kernel 'warp'"):
        get_kernel("warp")

    monkeypatch.setattr(cpu, "readiness", lambda: ("unavailable", "it needs a C++ compiler to build"))
    assert available_kernels() == ["reference"] and default_kernel() == "reference"
    assert RunSpec(prompt="hi").kernel == "reference"
    assert unavailable_kernels()["cpu"] == "it needs a C++ compiler to build"
    monkeypatch.setattr(cpu, "readiness", lambda: ("buildable", "it is not built yet"))
    assert available_kernels() == ["reference", "cpu"] and default_kernel() == "reference"   # never built on a click
    monkeypatch.setattr(cpu, "readiness", lambda: ("ready", ""))
    assert default_kernel() == "cpu" and RunSpec(prompt="hi").kernel == "cpu"


def test_cpu_probe_loads_what_is_built_and_never_builds(tmp_path):
    """In fresh processes: with the library built, `ready`; with an empty extension root, `buildable`
    and nothing built by asking; without a compiler, `unavailable` naming it."""
    import json
    import os
    import subprocess
    import sys

    from sam_viz.sparse_ops import cpu

    cpu.extension()                                                  # built here (once) if it is not yet
    code = ("import json, sam_viz.sparse_ops.cpu as c, sam_viz.sparse_ops as s; "
            "print(json.dumps([c.readiness(), s.default_kernel(), c.built_library().is_file()]))")

    def probe(**env):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parent.parent, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    assert probe() == [["ready", ""], "cpu", True]
    state, default, built = probe(TORCH_EXTENSIONS_DIR=str(tmp_path / "a"))
    assert state[0] == "buildable" and "build-kernels" in state[1] and default == "reference" and not built
    assert not list((tmp_path / "a").rglob("*.so"))
    state, default, _ = probe(TORCH_EXTENSIONS_DIR=str(tmp_path / "b"), CXX="no-such-compiler")
    assert state == ["unavailable", "it needs a C++ compiler to build, and 'no-such-compiler' is not on the PATH"]
    assert default == "reference"
