"""The `cpu` kernel backend: a compiled gather-GEMV (sparse_ops/csrc/sparse_mlp.cpp) that reads only
the selected rows of a layout prepared once per MLP: gate and up rows interleaved so one pass reads
both, and the down projection as rows of W_down^T (as Deja Vu and TEAL lay weights out).

Built on first use with torch.utils.cpp_extension (ninja, OpenMP, -O3 for this machine's SIMD) and
cached per CPU feature set, so a cache copied to another machine is never loaded there.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models import InputError, MLPWeights

SOURCE = Path(__file__).with_name("csrc") / "sparse_mlp.cpp"
ACTIVATIONS = {0: F.silu, 1: F.gelu, 2: lambda v: F.gelu(v, approximate="tanh"), 3: F.relu}
_LOCK = threading.Lock()
_EXT = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return "unknown"


def extension():
    """The compiled module, built (once per CPU feature set) on first use."""
    global _EXT
    with _LOCK:
        if _EXT is None:
            from torch.utils.cpp_extension import load

            tag = hashlib.sha256((_cpu_flags() + SOURCE.read_text()).encode()).hexdigest()[:12]
            try:
                _EXT = load(name=f"sam_viz_sparse_mlp_{tag}", sources=[str(SOURCE)],
                            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                            verbose=False)
            except Exception as exc:  # noqa: BLE001 - compiler errors come in many types
                raise InputError(f"the cpu kernel could not be built here ({type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ''})") from None
    return _EXT


@dataclass(frozen=True)
class Prepared:
    gu: torch.Tensor                 # [d_ff, groups * d]: gate_j then up_j (GLU), or in_j
    groups: int
    down: torch.Tensor               # [d_ff, d_out]
    b_gate: torch.Tensor | None
    b_up: torch.Tensor | None
    b_down: torch.Tensor | None
    act: int


_PREPARED: dict[tuple, Prepared] = {}


def activation_code(act) -> int:
    """Which activation `act` computes, found by evaluating it (adapters hand over modules)."""
    probe = torch.linspace(-6, 6, 241)
    for code, fn in ACTIVATIONS.items():
        if torch.allclose(act(probe), fn(probe), atol=1e-6, rtol=1e-5):
            return code
    raise InputError(f"the cpu kernel does not implement the activation {type(act).__name__}")


def prepare(w: MLPWeights, dtype: torch.dtype = torch.float32) -> Prepared:
    """The kernel's layout of one MLP, made once and cached by the weights' storage and dtype."""
    key = (w.gate.data_ptr(), w.up.data_ptr() if w.up is not None else 0, w.down_t.data_ptr(), dtype,
           tuple(w.gate.shape))
    with _LOCK:
        if key in _PREPARED:
            return _PREPARED[key]
    gu = w.gate if w.up is None else torch.cat([w.gate, w.up], dim=1)
    f32 = lambda b: None if b is None else b.detach().float().contiguous()  # noqa: E731
    prepared = Prepared(gu=gu.detach().to(dtype).contiguous(), groups=1 if w.up is None else 2,
                        down=w.down_t.detach().to(dtype).contiguous(), b_gate=f32(w.b_gate),
                        b_up=f32(w.b_up), b_down=f32(w.b_down), act=activation_code(w.act))
    with _LOCK:
        _PREPARED[key] = prepared
    return prepared


def sparse_mlp_shared(x: torch.Tensor, idx: torch.Tensor, p: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens x [n, d] sharing one index set idx [k] (one token, or the union of a few)."""
    return extension().sparse_mlp(x.float().contiguous(), p.gu, p.groups, p.down, p.b_gate, p.b_up, p.b_down,
                                  idx.long().contiguous(), p.act)


def cpu_kernel(x: torch.Tensor, idx: torch.Tensor, w: MLPWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The registry signature: each token with its own index set (-1 = none)."""
    if x.device.type != "cpu":
        raise InputError("the cpu kernel runs on CPU tensors only")
    p = prepare(w, w.gate.dtype if w.gate.dtype in (torch.float32, torch.bfloat16) else torch.float32)
    ys, hs = [], []
    for t in range(x.shape[0]):
        y, h = sparse_mlp_shared(x[t:t + 1], idx[t], p)
        ys.append(y)
        hs.append(h)
    return torch.cat(ys).to(x.dtype), torch.cat(hs).to(x.dtype)
