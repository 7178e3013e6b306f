"""The `triton` kernel backend: a gather-GEMV for the sparse MLP, as Deja Vu and TEAL run it on GPUs.

Two Triton kernels behind one custom op (`sam_viz::sparse_mlp_triton`, a `torch.library.triton_op`,
so torch.compile sees the kernels and traces around them without a graph break):
  1. h[n, s] = act(x_n . gate[idx[n, s]] + b_gate) * (x_n . up[idx[n, s]] + b_up): blocks of slots per
     program, d in BLOCK_D chunks; only the selected rows are read, -1 slots read nothing and give 0.
  2. partial[n, split, :] = sum over the split's slots of h[n, s] * down_t[idx[n, s], :], one program
     per (token, block of d_out, split of the slots); y = partial.sum(1) + b_down. No atomics, so
     the result is deterministic.
Weights are read in their own dtype (fp32, bf16, fp16) and accumulated in fp32; x is cast to fp32.
Activation 4 is gpt-oss's clamped SwiGLU (gate min(g, limit) sigmoid(alpha g), up clamp(u, +-limit) + 1).

A projection with a sparse input (`sam_viz::sparse_input_triton`, the input kernels' `triton`) is the
second kernel alone, its h gathered from x: y[n] = sum over the selected i of x[n, i] W^T[i, :] (+ b).

Runs on CUDA tensors; on the CPU only in Triton's interpreter (TRITON_INTERPRET=1 set before this
module is imported), which is how CI tests it.
"""
from __future__ import annotations

import threading
import weakref

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from sam_viz.models import InputError, KernelCannotCompute, MLPWeights

from .proj import ProjWeights

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOCK = threading.Lock()
_ROWS: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}
_ACT_CODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@triton.jit
def _act(v, ACT: tl.constexpr, LIMIT, ALPHA):
    """The activation codes of sam_viz.sparse_ops.cpu.activation_code: 0 silu, 1 gelu (erf), 2 gelu tanh, 3 relu;
    4 the gate side of a clamped SwiGLU."""
    if ACT == 0:
        v = v * tl.sigmoid(v)
    elif ACT == 1:
        v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACT == 2:                                        # 0.5 v (1 + tanh(z)) = v sigmoid(2z)
        z2 = 1.5957691216057308 * (v + 0.044715 * v * v * v)
        v = v * tl.sigmoid(tl.minimum(tl.maximum(z2, -40.0), 40.0))   # saturated past +-40: no exp overflow
    elif ACT == 4:
        v = tl.minimum(v, LIMIT)
        v = v * tl.sigmoid(ALPHA * v)
    else:
        v = tl.maximum(v, 0.0)
    return v


@triton.jit
def _h_kernel(x_ptr, idx_ptr, gate_ptr, up_ptr, bg_ptr, bu_ptr, h_ptr, D, K, stride_g, stride_u, LIMIT, ALPHA,
              HAS_UP: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr,
              BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (N, cdiv(K, BLOCK_S)): h for BLOCK_S slots of token n."""
    n = tl.program_id(0)
    slots = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)           # [BLOCK_S]
    j = tl.load(idx_ptr + n * K + slots, mask=slots < K, other=-1)
    valid = j >= 0
    row = tl.where(valid, j, 0)
    acc_g = tl.zeros([BLOCK_S], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_S], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)                                 # [BLOCK_D]
        x = tl.load(x_ptr + n * D + cols, mask=cols < D, other=0.0)[None, :]
        m = valid[:, None] & (cols < D)[None, :]                         # [BLOCK_S, BLOCK_D]
        g = tl.load(gate_ptr + row[:, None] * stride_g + cols[None, :], mask=m, other=0.0)
        acc_g += tl.sum(g.to(tl.float32) * x, axis=1)
        if HAS_UP:
            u = tl.load(up_ptr + row[:, None] * stride_u + cols[None, :], mask=m, other=0.0)
            acc_u += tl.sum(u.to(tl.float32) * x, axis=1)
    if HAS_BG:
        acc_g += tl.load(bg_ptr + row, mask=valid, other=0.0)
    h = _act(acc_g, ACT, LIMIT, ALPHA)
    if HAS_UP:
        if HAS_BU:
            acc_u += tl.load(bu_ptr + row, mask=valid, other=0.0)
        if ACT == 4:
            acc_u = tl.minimum(tl.maximum(acc_u, -LIMIT), LIMIT) + 1.0
        h = h * acc_u
    tl.store(h_ptr + n * K + slots, tl.where(valid, h, 0.0), mask=slots < K)


@triton.jit
def _down_kernel(idx_ptr, h_ptr, down_ptr, part_ptr, K, D_OUT, stride_d, stride_h, SLOTS, N_SPLIT,
                 GATHER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_O: tl.constexpr):
    """Grid (N, cdiv(D_OUT, BLOCK_O), N_SPLIT): the split's SLOTS slots (a multiple of BLOCK_S) of
    token n, projected onto BLOCK_O outputs. The weight of slot s is h[n, s] (the MLP's activations,
    rows stride_h apart), or with GATHER x[n, idx[n, s]] (a sparse input, rows stride_h apart)."""
    n = tl.program_id(0)
    split = tl.program_id(2)
    cols = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)           # [BLOCK_O]
    acc = tl.zeros([BLOCK_O], dtype=tl.float32)
    for s0 in range(0, SLOTS, BLOCK_S):
        slots = split * SLOTS + s0 + tl.arange(0, BLOCK_S)               # [BLOCK_S]
        j = tl.load(idx_ptr + n * K + slots, mask=slots < K, other=-1)
        valid = j >= 0
        row = tl.where(valid, j, 0)
        if GATHER:
            h = tl.load(h_ptr + n * stride_h + row, mask=valid, other=0.0)
        else:
            h = tl.load(h_ptr + n * stride_h + slots, mask=valid, other=0.0)
        m = valid[:, None] & (cols < D_OUT)[None, :]                     # [BLOCK_S, BLOCK_O]
        w = tl.load(down_ptr + row[:, None] * stride_d + cols[None, :], mask=m, other=0.0)
        acc += tl.sum(h[:, None] * w.to(tl.float32), axis=0)
    tl.store(part_ptr + (n * N_SPLIT + split) * D_OUT + cols, acc, mask=cols < D_OUT)


def _target_programs(device: torch.device) -> int:
    """Programs per launch that keep a GPU's memory system busy; 1 (the fewest) in the interpreter."""
    if device.type != "cuda":
        return 1
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _launch(n: int, d: int, k: int, d_out: int, target: int) -> tuple[dict, dict, int]:
    """Block sizes of the two kernels and the number of slot splits. On a GPU, two rows per program
    and long row chunks for h, 64 x 128 tiles of W_down^T rows, ~target programs (the fastest of a
    sweep on an H200 at the Llama-7B and TinyLlama shapes); in the interpreter, the fewest programs."""
    block_s = 2 if target > 1 else _pow2(k, 2, 16)
    block_d = _pow2(d, 16, 2048)
    h = dict(BLOCK_S=block_s, BLOCK_D=block_d, num_warps=8 if block_d >= 2048 else 4)
    return (h, *_down_launch(n, k, d_out, target))


def _down_launch(n: int, k: int, d_out: int, target: int) -> tuple[dict, int]:
    """The second kernel's blocks and the slots per split (the sparse input's launch, untuned)."""
    block_o, block_k = _pow2(d_out, 16, 128), _pow2(k, 2, 64)
    splits = max(1, min(triton.cdiv(k, block_k), triton.cdiv(target, n * triton.cdiv(d_out, block_o))))
    slots = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k       # per split, a multiple of block_k
    return dict(BLOCK_S=block_k, BLOCK_O=block_o, num_warps=8 if block_k * block_o >= 8192 else 4), slots


def interpreted() -> bool:
    """Whether this module's kernels run in Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return isinstance(_h_kernel, InterpretedFunction)


# triton_op exposes the kernels to torch.compile, which traces fn on fake tensors: compiled kernels
# allow that, the interpreter does not (it runs them), so there the op is an opaque custom op.
_define_op = torch.library.custom_op if interpreted() else torch.library.triton_op


@_define_op("sam_viz::sparse_mlp_triton", mutates_args=())
def sparse_mlp_triton(x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor, up: torch.Tensor | None,
                      down_t: torch.Tensor, b_gate: torch.Tensor | None, b_up: torch.Tensor | None,
                      b_down: torch.Tensor | None, act: int, limit: float = 0.0,
                      alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, d] fp32, idx [N, k] int64, weight rows with unit column stride, biases fp32
    -> (y [N, d_out] fp32, h [N, k] fp32). limit, alpha: act 4's (clamped SwiGLU)."""
    n, d = x.shape
    k, d_out = idx.shape[1], down_t.shape[1]
    cfg_h, cfg_down, slots = _launch(n, d, k, d_out, _target_programs(x.device))
    splits = triton.cdiv(k, slots)
    h = torch.empty(n, k, device=x.device, dtype=torch.float32)
    part = torch.empty(n, splits, d_out, device=x.device, dtype=torch.float32)
    wrap = torch.library.wrap_triton
    wrap(_h_kernel)[(n, triton.cdiv(k, cfg_h["BLOCK_S"]))](
        x, idx, gate, gate if up is None else up, x if b_gate is None else b_gate, x if b_up is None else b_up, h,
        d, k, gate.stride(0), gate.stride(0) if up is None else up.stride(0), limit, alpha,
        HAS_UP=up is not None, HAS_BG=b_gate is not None, HAS_BU=b_up is not None, ACT=act, **cfg_h)
    wrap(_down_kernel)[(n, triton.cdiv(d_out, cfg_down["BLOCK_O"]), splits)](
        idx, h, down_t, part, k, d_out, down_t.stride(0), k, slots, splits, GATHER=False, **cfg_down)
    y = part.sum(1)
    return (y if b_down is None else y + b_down), h


@sparse_mlp_triton.register_fake
def _(x, idx, gate, up, down_t, b_gate, b_up, b_down, act, limit=0.0, alpha=0.0):
    """Shapes only (the interpreter cannot run on fake tensors)."""
    return (x.new_empty(x.shape[0], down_t.shape[1], dtype=torch.float32),
            x.new_empty(idx.shape, dtype=torch.float32))


@_define_op("sam_viz::sparse_input_triton", mutates_args=())
def sparse_input_triton(x: torch.Tensor, idx: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [N, d_in] fp32, idx [N, k] int64, wt [d_in, d_out] = rows of W^T with unit column stride,
    bias fp32 -> y [N, d_out] fp32."""
    n, d_in = x.shape
    k, d_out = idx.shape[1], wt.shape[1]
    if k == 0:                                     # nothing selected: the bias alone
        y = torch.zeros(n, d_out, device=x.device, dtype=torch.float32)
        return y if bias is None else y + bias
    cfg, slots = _down_launch(n, k, d_out, _target_programs(x.device))
    splits = triton.cdiv(k, slots)
    part = torch.empty(n, splits, d_out, device=x.device, dtype=torch.float32)
    torch.library.wrap_triton(_down_kernel)[(n, triton.cdiv(d_out, cfg["BLOCK_O"]), splits)](
        idx, x, wt, part, k, d_out, wt.stride(0), d_in, slots, splits, GATHER=True, **cfg)
    y = part.sum(1)
    return y if bias is None else y + bias


@sparse_input_triton.register_fake
def _(x, idx, wt, bias):
    return x.new_empty(x.shape[0], wt.shape[1], dtype=torch.float32)


def _device(t: torch.Tensor) -> torch.device:
    """Where the kernels run: the weights' device; a CUDA device for CPU weights (copied once)."""
    if t.device.type == "cuda" or interpreted():
        return t.device
    if not torch.cuda.is_available():
        raise InputError("the triton kernel needs a CUDA GPU (or TRITON_INTERPRET=1 to run it slowly on the CPU)")
    return torch.device("cuda", torch.cuda.current_device())


def _rows(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """t with contiguous rows, in dtype on device: t itself when it already is; else a copy, made
    once and kept while the tensor that t views lives (e.g. down_t, a transposed view of W_down)."""
    if t.stride(-1) == 1 and t.dtype == dtype and t.device == device:
        return t.detach()
    base = t if t._base is None else t._base                # e.g. the nn.Parameter that t views
    key = (id(base), t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, dtype, device)
    with _LOCK:
        hit = _ROWS.get(key)
    if hit is not None and hit[0]() is base:
        return hit[1]
    out = t.detach().to(device=device, dtype=dtype).contiguous()
    with _LOCK:
        _ROWS[key] = (weakref.ref(base, lambda _, key=key: _ROWS.pop(key, None)), out)
    return out


def _act_code(w: MLPWeights) -> tuple[int, float, float]:
    """(code, limit, alpha) as the cpu kernel names them."""
    from .cpu import CLAMPED_SWIGLU, activation_code, clamped_swiglu     # pure torch: builds nothing

    if w.up_act is not None:
        try:
            return (CLAMPED_SWIGLU, *clamped_swiglu(w))
        except InputError:
            raise KernelCannotCompute(f"the triton kernel does not implement the activation {type(w.act).__name__} "
                                      f"with {type(w.up_act).__name__} on the up projection (the reference kernel "
                                      "runs any activation)") from None
    act = w.act
    try:
        return _ACT_CODES[act], 0.0, 0.0
    except (KeyError, TypeError):
        pass
    try:
        code = activation_code(act)
    except InputError:
        raise KernelCannotCompute(f"the triton kernel does not implement the activation {type(act).__name__} "
                                  "(the reference kernel runs any activation)") from None
    try:
        _ACT_CODES[act] = code
    except TypeError:                              # not weak-referenceable: probe every call
        pass
    return code, 0.0, 0.0


def triton_kernel(x: torch.Tensor, idx: torch.Tensor, w: MLPWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """The registry signature; y and h come back on x's device, in x's dtype."""
    device = _device(w.gate)
    dtype = w.gate.dtype if w.gate.dtype in WEIGHT_DTYPES else torch.float32
    bias = lambda b: None if b is None else _rows(b, torch.float32, device)  # noqa: E731
    y, h = torch.ops.sam_viz.sparse_mlp_triton(
        x.detach().to(device=device, dtype=torch.float32).contiguous(),
        idx.detach().to(device=device, dtype=torch.int64).contiguous(),
        _rows(w.gate, dtype, device), None if w.up is None else _rows(w.up, dtype, device),
        _rows(w.down_t, dtype, device), bias(w.b_gate), bias(w.b_up), bias(w.b_down), *_act_code(w))
    return y.to(device=x.device, dtype=x.dtype), h.to(device=x.device, dtype=x.dtype)


def triton_input_kernel(x: torch.Tensor, idx: torch.Tensor, p: ProjWeights) -> torch.Tensor:
    """The input kernels' registry signature; y comes back on x's device, in x's dtype. W^T's rows are
    the weight itself where it is stored [in, out] (GPT-2's Conv1D), else a copy made once."""
    device = _device(p.weight)
    dtype = p.weight.dtype if p.weight.dtype in WEIGHT_DTYPES else torch.float32
    y = torch.ops.sam_viz.sparse_input_triton(
        x.detach().to(device=device, dtype=torch.float32).contiguous(),
        idx.detach().to(device=device, dtype=torch.int64).contiguous(), _rows(p.weight.t(), dtype, device),
        None if p.bias is None else _rows(p.bias, torch.float32, device))
    return y.to(device=x.device, dtype=x.dtype)
