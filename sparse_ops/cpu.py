"""The `cpu` kernel backend: a compiled gather-GEMV (sparse_ops/csrc/sparse_mlp.cpp) that reads only
the selected rows of a layout prepared once per MLP: gate and up rows interleaved so one pass reads
both, and the down projection as rows of W_down^T (as Deja Vu and TEAL lay weights out). For a
projection with a sparse input (`input_kernel`), the rows of W^T, one per input channel, prepared once
per weight the same way.

Built with torch.utils.cpp_extension (ninja, OpenMP, -O3 for this machine's SIMD) by `python -m sam_viz
build-kernels` (which `make` runs) or on first use, and cached per CPU feature set under torch's
extension root (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so a cache copied to another
machine is never loaded there. `readiness()` says, without building, whether it runs here.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sam_viz.models import InputError, KernelCannotCompute, MLPWeights

from .proj import ProjWeights

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "sparse_mlp.cpp"
HEADER = CSRC / "sparse_mlp_kernel.h"
HEADERS = (HEADER, CSRC / "sparse_input_kernel.h")
ACTIVATIONS = {0: F.silu, 1: F.gelu, 2: lambda v: F.gelu(v, approximate="tanh"), 3: F.relu}
ACTIVATION_NAMES = {0: "SiLU", 1: "GELU", 2: "GELU (tanh)", 3: "ReLU"}
CLAMPED_SWIGLU = 4                 # gpt-oss: min(g, limit) sigmoid(alpha min(g, limit)) (clamp(u, +-limit) + 1)
# native: -march=native (the AVX-512 intrinsics path where this CPU has AVX-512, the portable path
# otherwise); portable: the portable path, as a machine without AVX-512 builds it (x86-64-v3 = AVX2
# on x86, the compiler's default elsewhere). SAM_VIZ_CPU_ISA=portable selects it at load time.
VARIANTS = ("native", "portable")
_LOCK = threading.RLock()            # re-entrant: a weakref callback (a freed model) may run under it
_EXT: dict[str | None, object] = {}        # None: the default variant


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return "unknown"


def _cflags(variant: str) -> list[str]:
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if variant == "native":
        return flags + ["-march=native"]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return flags + ["-DSAM_VIZ_PORTABLE"] + (["-march=x86-64-v3", "-mno-avx512f"] if x86 else [])


def default_variant() -> str:
    return os.environ.get("SAM_VIZ_CPU_ISA") or "native"


@functools.cache
def _name(variant: str) -> str:
    """The extension's name: a new one whenever the CPU, the variant, the flags or the source change,
    so that a library built under this name can be loaded as it is. (Once per process: the probe
    asks on every page and every run.)"""
    text = _cpu_flags() + variant + " ".join(_cflags(variant)) + "".join(f.read_text() for f in (SOURCE, *HEADERS))
    return f"sam_viz_sparse_mlp_{variant}_{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def built_library(variant: str | None = None) -> Path:
    """Where torch's cpp_extension puts (or has put) the compiled library of this variant."""
    from torch.utils.cpp_extension import _get_build_directory

    name = _name(variant or default_variant())
    return Path(_get_build_directory(name, verbose=False)) / f"{name}.so"


def extension(variant: str | None = None):
    """The compiled module, built (once per CPU feature set and variant) on first use. With no
    variant: SAM_VIZ_CPU_ISA's, or native, read on the first call (the per-call path stays a lookup)."""
    if variant is None:
        ext = _EXT.get(None)
        if ext is not None:
            return ext
        ext = _EXT[None] = extension(default_variant())
        return ext
    ext = _EXT.get(variant)                         # built already: no lock on the per-call path
    if ext is not None:
        return ext
    if variant not in VARIANTS:
        raise InputError(f"SAM_VIZ_CPU_ISA must be one of {', '.join(VARIANTS)}, not '{variant}'")
    with _LOCK:
        if variant not in _EXT:
            try:
                _EXT[variant] = _load_built(variant) or _build(variant)
            except Exception as exc:  # noqa: BLE001 - compiler errors come in many types
                last = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else ""
                _FAILED[variant] = f"its build failed ({type(exc).__name__}: {last})"
                raise InputError(f"the cpu kernel could not be built here ({type(exc).__name__}: {last})") from None
    return _EXT[variant]


def _load_built(variant: str):
    """The library already built under this variant's name, imported as it is; None if there is none
    or it does not import (a build still being written: _build then waits for it). torch's load()
    would run ninja first, and rebuild whenever the sources sit at another path than at build time
    (an installed copy next to a checkout), so each would rebuild the other's library."""
    lib = built_library(variant)
    if not lib.is_file():
        return None
    spec = importlib.util.spec_from_file_location(lib.stem, lib)
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


def _build(variant: str):
    from torch.utils.cpp_extension import load

    return load(name=_name(variant), sources=[str(SOURCE)], extra_cflags=_cflags(variant),
                extra_include_paths=[str(CSRC)], extra_ldflags=["-fopenmp"], verbose=False)


_FAILED: dict[str, str] = {}               # variant -> why its build failed in this process


def readiness() -> tuple[str, str]:
    """Whether the default variant runs here, without building it: ("ready", "") when it is loaded,
    or built and loads; ("buildable", why not ready) when it is not built but a C++ compiler and
    ninja are found (it builds on first use, about a minute); ("unavailable", why) otherwise. Cheap:
    at most one load of an already built library per process."""
    variant = default_variant()
    if _EXT.get(None) is not None or _EXT.get(variant) is not None:
        return "ready", ""
    if variant not in VARIANTS:
        return "unavailable", f"SAM_VIZ_CPU_ISA is '{variant[:20]}', not one of {', '.join(VARIANTS)}"
    if variant in _FAILED:
        return "unavailable", _FAILED[variant]
    if built_library(variant).is_file():
        try:
            extension()
            return "ready", ""
        except InputError:
            return "unavailable", _FAILED.get(variant, "its built library does not load")
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return "unavailable", f"it needs a C++ compiler to build, and '{compiler[:40]}' is not on the PATH"
    if not is_ninja_available():
        return "unavailable", "it needs ninja to build, and ninja is not installed"
    return "buildable", "it is not built yet: `python -m sam_viz build-kernels` builds it (about a minute)"


@dataclass(frozen=True)
class Prepared:
    gu: torch.Tensor                 # [d_ff, groups * d]: gate_j then up_j (GLU), or in_j
    groups: int
    down: torch.Tensor               # [d_ff, d_out]
    b_gate: torch.Tensor | None
    b_up: torch.Tensor | None
    b_down: torch.Tensor | None
    act: int
    limit: float = 0.0               # CLAMPED_SWIGLU's parameters
    alpha: float = 0.0


# key -> (Prepared, weakrefs to the weights it was made from). An entry lives exactly as long as those
# weights: when any of them is freed, a callback drops it (and its copy of the layout), so a later
# model that happens to reuse the same addresses never gets an old model's layout.
_PREPARED: dict[tuple, tuple[Prepared, list]] = {}


def _root(t: torch.Tensor) -> torch.Tensor:
    """The tensor owning t's memory (a Parameter, for the views adapters hand over)."""
    while t._base is not None:
        t = t._base
    return t


def _key(t: torch.Tensor | None) -> tuple:
    return () if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


# Where activations are told apart: the curved part, and far out, where clipped variants (transformers'
# gelu_10, ReLU6) leave the function they follow near zero.
_PROBE = torch.cat([torch.linspace(-6, 6, 241), torch.tensor([-1e4, -100.0, -20.0, -11.0, 11.0, 20.0, 100.0, 1e4])])


def activation_code(act) -> int:
    """Which activation `act` computes, found by evaluating it (adapters hand over modules)."""
    for code, fn in ACTIVATIONS.items():
        if torch.allclose(act(_PROBE.clone()), fn(_PROBE), atol=1e-6, rtol=1e-5):   # clone: act may work in place
            return code
    raise KernelCannotCompute(f"the cpu kernel does not implement the activation {type(act).__name__}; it "
                              f"computes {', '.join(ACTIVATION_NAMES.values())} (the reference kernel runs any "
                              "activation)")


def _cached(key: tuple, tensors: list[torch.Tensor], build):
    """build(), made once per key and kept exactly as long as the tensors that `tensors` view."""
    with _LOCK:
        hit = _PREPARED.get(key)
        if hit is not None and all(ref() is not None for ref in hit[1]):
            return hit[0]
    value = build()

    def drop(_ref, key=key):
        with _LOCK:
            entry = _PREPARED.get(key)
            if entry is not None and _ref in entry[1]:
                del _PREPARED[key]

    refs = [weakref.ref(root, drop) for root in {id(r): r for r in map(_root, tensors)}.values()]
    with _LOCK:
        _PREPARED[key] = (value, refs)
    return value


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def clamped_swiglu(w: MLPWeights) -> tuple[float, float]:
    """(limit, alpha) of a clamped SwiGLU (gpt-oss's, models.ClampedSwish with ClampedShift), read from
    the activation and checked by value on both sides; anything else on the up projection is refused."""
    limit, alpha = getattr(w.act, "limit", None), getattr(w.act, "alpha", None)
    if limit is not None and alpha is not None:
        g = _PROBE.clamp(max=limit)
        if (_close(w.act(_PROBE.clone()), g * torch.sigmoid(alpha * g))
                and _close(w.up_act(_PROBE.clone()), _PROBE.clamp(-limit, limit) + 1)):
            return float(limit), float(alpha)
    raise KernelCannotCompute(f"the cpu kernel does not implement the activation {type(w.act).__name__} with "
                              f"{type(w.up_act).__name__} on the up projection; it computes a clamped SwiGLU and "
                              f"{', '.join(ACTIVATION_NAMES.values())} (the reference kernel runs any activation)")


def prepare(w: MLPWeights, dtype: torch.dtype = torch.float32) -> Prepared:
    """The kernel's layout of one MLP, made once per weights and dtype, kept while the weights live.
    (Weights changed in place later are not seen: the layout is a copy.)"""
    tensors = [t for t in (w.gate, w.up, w.down_t, w.b_gate, w.b_up, w.b_down) if t is not None]
    key = tuple(_key(t) for t in (w.gate, w.up, w.down_t, w.b_gate, w.b_up, w.b_down)) + (dtype,)

    def build() -> Prepared:
        act = (CLAMPED_SWIGLU, *clamped_swiglu(w)) if w.up_act is not None else (activation_code(w.act),)
        gu = w.gate if w.up is None else torch.cat([w.gate, w.up], dim=1)
        return Prepared(gu.detach().to(dtype).contiguous(), 1 if w.up is None else 2,
                        w.down_t.detach().to(dtype).contiguous(), _f32(w.b_gate), _f32(w.b_up), _f32(w.b_down), *act)

    return _cached(key, tensors, build)


def _f32(b: torch.Tensor | None) -> torch.Tensor | None:
    return None if b is None else b.detach().float().contiguous()


def _args(p: Prepared, idx: torch.Tensor):
    return p.gu, p.groups, p.down, p.b_gate, p.b_up, p.b_down, idx.long().contiguous(), p.act, p.limit, p.alpha


def sparse_mlp_shared(x: torch.Tensor, idx: torch.Tensor, p: Prepared, variant: str | None = None,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens x [n, d] sharing one index set idx [k] (one token, or the union of a few): (y [n, d_out],
    h [n, k]). With out=(y, h) (fp32, contiguous), written there: a decode loop that reuses its
    buffers saves the two allocations per call (~3 us measured, ~2% of a TinyLlama-sized call at 0.05)."""
    ext = extension(variant)
    args = (x.float().contiguous(), *_args(p, idx))
    if out is None:
        return ext.sparse_mlp(*args)
    ext.sparse_mlp_out(*args, *out)
    return out


def cpu_kernel(x: torch.Tensor, idx: torch.Tensor, w: MLPWeights,
               variant: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The registry signature: each token with its own index set (-1 = none)."""
    if x.device.type != "cpu":
        raise InputError("the cpu kernel runs on CPU tensors only")
    p = prepare(w, _layout_dtype(w.gate))
    y, h = extension(variant).sparse_mlp_tokens(x.float().contiguous(), *_args(p, idx))
    return y.to(x.dtype), h.to(x.dtype)


def _layout_dtype(t: torch.Tensor) -> torch.dtype:
    """What the compiled kernels read: the weights' own fp32 or bf16; anything else (fp16) as fp32."""
    return t.dtype if t.dtype in (torch.float32, torch.bfloat16) else torch.float32


@dataclass(frozen=True)
class PreparedProj:
    wt: torch.Tensor                 # [d_in, d_out]: row i = W[:, i], the weights of input channel i
    bias: torch.Tensor | None        # [d_out] fp32


def prepare_proj(p: ProjWeights, dtype: torch.dtype = torch.float32) -> PreparedProj:
    """The rows of W^T, made once per weight and dtype and kept while the weight lives (no copy when
    W^T is already contiguous in dtype, as GPT-2's Conv1D stores it)."""
    key = ("proj", _key(p.weight), _key(p.bias), dtype)
    tensors = [t for t in (p.weight, p.bias) if t is not None]
    return _cached(key, tensors, lambda: PreparedProj(p.weight.detach().t().to(dtype).contiguous(), _f32(p.bias)))


def input_kernel(x: torch.Tensor, idx: torch.Tensor, p: ProjWeights, variant: str | None = None) -> torch.Tensor:
    """The input kernels' registry signature: x [N, d_in], idx [N, k] (-1 = none; distinct entries per
    token) -> y [N, d_out] = sum over the selected i of x[:, i] W[:, i] (+ b), reading only those rows."""
    if x.device.type != "cpu" or p.weight.device.type != "cpu":
        raise InputError("the cpu kernel runs on CPU tensors only")
    pp = prepare_proj(p, _layout_dtype(p.weight))
    return extension(variant).sparse_input(x.float().contiguous(), pp.wt, pp.bias, idx.long().contiguous()).to(x.dtype)
