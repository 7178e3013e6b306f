"""Sparsity on every projection's input (DESIGN.md, "Sparsity on every projection"): which entries of x
a projection reads for each token, and the wrapper that applies it to the attention projections.

Per token, the run's policy keeps input entry i of a projection y = W x (+ b), W [d_out, d_in], when:
- `topk` (Q-Sparse): it is among the k = round(density * d_in) largest abs(x_i), ties to the lower index;
- `teal` (TEAL): abs(x_i) > t;
- `wina` (WINA): abs(x_i) * ||W[:, i]||_2 > t, the column norms computed once per weight;
with t = run.input_calibration.threshold(layer, projection name, density, allocation). The projection
then computes y = W[:, S] x_S (+ b) through `project`. The MLP's projections (gate, up, down on the
neurons h) are applied inside SparseMLP, per MLP unit (MoE experts included), with the same functions.

`InputRecorder` keeps, per layer and projection, how many input entries each token kept, the weights
that read, and (on request) the kept entries as packed bits [T, ceil(d_in / 8)].
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sam_viz.models import InputError, LoadedModel, MLPAdapter, Proj
from sam_viz.models.adapters import get_path, mlp_projections, set_path

from .context import Run, current_run
from .policy import mask_indices, topk_mask
from .proj import ProjWeights


def keep_mask(run: Run, layer: int, name: str, x: torch.Tensor, weight: torch.Tensor,
              norms: "NormCache", key=None) -> torch.Tensor | None:
    """[N, d_in] bool: the input entries of x [N, d_in] that projection `name` of `layer` (weight
    [d_out, d_in]) reads under the run's policy; None when it reads them all (dense, density 1)."""
    policy, d_in = run.policy, x.shape[-1]
    if policy.is_full:
        return None
    if policy.kind == "topk":
        return topk_mask(x, policy.k(d_in))                                   # [N, d_in]
    t = run.input_threshold(layer, name)
    score = x.abs()
    if policy.kind == "wina":
        score = score * norms.get(key if key is not None else name, weight)   # [N, d_in] * [d_in]
    return score > t


def project(run: Run, x: torch.Tensor, mask: torch.Tensor | None, weight: torch.Tensor,
            bias: torch.Tensor | None) -> torch.Tensor:
    """y = W[:, S] x_S (+ b) for x [N, d_in], weight [d_out, d_in]: the dense projection of the masked
    input, F.linear(x * mask, W, b). The one place the whole-model scope computes a projection, through
    the run's sparse-input kernel (sam_viz.sparse_ops.kernels.INPUT_KERNELS: the same backend as its MLP kernel),
    which reads only the columns of W that the mask keeps."""
    if mask is None:
        return F.linear(x, weight, bias)
    if run.input_kernel is None:
        return F.linear(x * mask, weight, bias)
    return run.input_kernel(x, mask_indices(mask), ProjWeights(weight, bias))


class NormCache:
    """||W[:, i]||_2 of each input column of a weight [d_out, d_in], computed once per weight (WINA)
    and again only when the weight changes in place."""

    def __init__(self):
        self._cache: dict = {}

    def get(self, key, weight: torch.Tensor) -> torch.Tensor:
        stamp = (weight.data_ptr(), weight._version, tuple(weight.shape))
        hit = self._cache.get(key)
        if hit is None or hit[0] != stamp:
            hit = self._cache[key] = (stamp, weight.detach().float().norm(dim=0).to(weight.dtype))   # [d_in]
        return hit[1]


class SparseLinear(nn.Module):
    """One projection of a block outside the MLP (attention q, k, v or fused qkv, o; MLA's latents),
    installed once in its place with the original inside (`.dense`). Outside a run, and under scope
    mlp, it calls the original; under scope all, it reads only the kept entries of its input."""

    def __init__(self, layer: int, proj: Proj, dense: nn.Module, conv1d: bool):
        super().__init__()
        self.layer, self.name, self.group = layer, proj.name, proj.group
        self.dense = dense
        self.conv1d = conv1d                 # GPT-2's Conv1D stores the weight [d_in, d_out]
        self.norms = NormCache()

    def extra_repr(self) -> str:
        return f"layer={self.layer}, name={self.name}"

    @property
    def weight(self) -> torch.Tensor:
        """The original's weight as stored (code of the family may read its dtype or device)."""
        return self.dense.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.dense, "bias", None)

    def matrix(self) -> torch.Tensor:
        """The weight as [d_out, d_in]."""
        return self.dense.weight.t() if self.conv1d else self.dense.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = current_run()
        if run is None or run.policy.scope != "all":
            return self.dense(x)
        x2, w = x.reshape(-1, x.shape[-1]), self.matrix()                      # [N, d_in], [d_out, d_in]
        mask = keep_mask(run, self.layer, self.name, x2, w, self.norms)
        y = self.dense(x) if mask is None else project(run, x2, mask, w, self.bias).reshape(*x.shape[:-1], -1)
        if run.inputs is not None:
            run.inputs.add(self.layer, self.name, torch.arange(x2.shape[0], device=x.device), mask, x2.shape[-1],
                           w.shape[0])
        return y


_INSTALL_LOCK = threading.Lock()


def in_mlp(adapter: MLPAdapter, path: str) -> bool:
    """Whether a projection belongs to the MLP, which SparseMLP computes (its entry and tail modules)."""
    return any(path == root or path.startswith(root + ".") for root in (adapter.entry, *adapter.tail))


def check_declared(loaded: LoadedModel, dense_mlp: bool) -> None:
    """One sentence when scope all cannot run the model whole: its family declares no projections, or
    (dense_mlp: some layer has a dense MLP) not those of its dense MLP."""
    adapter = loaded.adapter
    roles = set(mlp_projections(adapter)) | ({"up"} if adapter.up is None and adapter.gate_up is None else set())
    if adapter.projections is None or (dense_mlp and not {"gate", "up", "down"} <= roles):
        raise InputError(f"scope all is not available for {loaded.model_type} models yet: their adapter does not "
                         "declare every projection, and a model is never run half-sparse; use scope mlp")


def install_projections(loaded: LoadedModel) -> list[SparseLinear]:
    """Wrap every declared projection outside the MLP, once (idempotent, thread-safe), and the MLPs
    (SparseMLP). InputError (check_declared) for a family that does not declare them, or a declared one
    that a layer lacks."""
    from .mlp import install                         # mlp imports this module

    check_declared(loaded, dense_mlp=any(w.moe is None for w in install(loaded)))
    adapter, wrappers = loaded.adapter, []
    outside = [p for p in adapter.projections if not in_mlp(adapter, p.path)]
    with _INSTALL_LOCK:
        for i, layer in enumerate(loaded.layers):
            for proj in outside:
                try:
                    module = get_path(layer, proj.path)
                except AttributeError:
                    module = None
                if module is None and proj.optional:
                    continue
                if not isinstance(module, nn.Module):
                    raise InputError(f"scope all cannot run this {loaded.model_type} model: layer {i} has no "
                                     f"projection '{proj.path}' where its adapter declares {proj.name}")
                if not isinstance(module, SparseLinear):
                    module = SparseLinear(i, proj, module, adapter.conv1d)
                    set_path(layer, proj.path, module)
                wrappers.append(module)
    return wrappers


def attention_weights(loaded: LoadedModel) -> list[dict[str, int]] | None:
    """Per layer, {name: matrix weights} of the declared projections outside the MLP (attention), which
    every token reads; None when the family declares none."""
    adapter = loaded.adapter
    if adapter.projections is None:
        return None
    out = []
    for layer in loaded.layers:
        sizes = {}
        for proj in adapter.projections:
            if in_mlp(adapter, proj.path):
                continue
            try:
                module = get_path(layer, proj.path)
            except AttributeError:
                module = None
            if module is not None:
                sizes[proj.name] = module.weight.numel()
        out.append(sizes)
    return out


def pack(mask: torch.Tensor) -> torch.Tensor:
    """[N, d] bool -> [N, ceil(d / 8)] uint8, entry i in bit 7 - i % 8 of byte i // 8 (numpy's packbits)."""
    n, d = mask.shape
    padded = torch.zeros(n, math.ceil(d / 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :d] = mask
    bits = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=mask.device)
    return (padded.view(n, -1, 8) * bits).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, d: int) -> torch.Tensor:
    """The inverse of `pack`: [N, ceil(d / 8)] uint8 -> [N, d] bool."""
    bits = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=packed.device)
    return ((packed[:, :, None] & bits) > 0).reshape(packed.shape[0], -1)[:, :d]


@dataclass
class ProjectionInputs:
    """One projection of one layer over a pass of T tokens. For an MoE layer's expert projections
    (gate, up, down), the counts sum over the experts that ran each token and no mask is kept."""
    name: str
    d_in: int
    kept: torch.Tensor                # [T] int64: input entries read per token
    possible: torch.Tensor            # [T] int64: input entries the dense model reads
    weights_read: torch.Tensor        # [T] int64: matrix weights read per token (kept entries x d_out)
    weights_total: torch.Tensor       # [T] int64: matrix weights the dense model reads
    mask: torch.Tensor | None = None  # [T, ceil(d_in / 8)] uint8 packed kept entries (see `kept_mask`)

    @property
    def density(self) -> float:
        """The share of its input entries this projection read, over every token."""
        total = int(self.possible.sum())
        return int(self.kept.sum()) / total if total else 1.0

    def kept_mask(self) -> torch.Tensor | None:
        """[T, d_in] bool: the input entries read per token; None when not kept."""
        return None if self.mask is None else unpack(self.mask, self.d_in)


@dataclass
class _InputPart:
    rows: torch.Tensor                # [n] token positions
    kept: torch.Tensor                # [n]
    d_in: int
    d_out: int
    packed: torch.Tensor | None


@dataclass
class InputRecorder:
    """Filled by the projections of a scope-all run (one forward pass of one sequence, or a batch
    flattened to rows); `layers(T)` reads it. keep_masks: also keep each dense projection's kept
    entries as packed bits (MoE expert projections keep counts only)."""
    keep_masks: bool = False
    _parts: dict[tuple[int, str], list[_InputPart]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, layer: int, name: str, rows: torch.Tensor, mask: torch.Tensor | None, d_in: int, d_out: int,
            keep: bool = True) -> None:
        """rows [n]; mask [n, d_in] bool (None: every entry read)."""
        kept = torch.full((rows.numel(),), d_in, dtype=torch.int64) if mask is None else mask.sum(-1).cpu()
        packed = None
        if self.keep_masks and keep:
            packed = pack(torch.ones(rows.numel(), d_in, dtype=torch.bool) if mask is None else mask.cpu())
        part = _InputPart(rows.detach().cpu(), kept, d_in, d_out, packed)
        with self._lock:
            self._parts.setdefault((layer, name), []).append(part)

    def layers(self, n_tokens: int) -> list[dict[str, ProjectionInputs]]:
        """Per layer (0 .. the last recorded), {projection name: ProjectionInputs} in the order run."""
        out: list[dict[str, ProjectionInputs]] = []
        for (layer, name), parts in self._parts.items():
            while len(out) <= layer:
                out.append({})
            out[layer][name] = _assemble(name, parts, n_tokens)
        return out

    def model_density(self, n_tokens: int) -> float:
        """The share of the blocks' matrix weights read per token (embeddings excluded)."""
        return model_density(self.layers(n_tokens))

    def weights(self) -> tuple[int, int]:
        """(matrix weights read, matrix weights the dense model reads), summed over every token recorded."""
        parts = [p for ps in self._parts.values() for p in ps]
        return (sum(int(p.kept.sum()) * p.d_out for p in parts),
                sum(p.rows.numel() * p.d_in * p.d_out for p in parts))


def model_density(layers: list[dict[str, ProjectionInputs]]) -> float:
    read = sum(int(p.weights_read.sum()) for layer in layers for p in layer.values())
    total = sum(int(p.weights_total.sum()) for layer in layers for p in layer.values())
    return read / total if total else 1.0


def _assemble(name: str, parts: list[_InputPart], n: int) -> ProjectionInputs:
    def per_token(values) -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.int64)
        for p, v in zip(parts, values):
            out.index_add_(0, p.rows, v)
        return out

    d_in = max(p.d_in for p in parts)
    mask = None
    if all(p.packed is not None for p in parts) and len({p.d_in for p in parts}) == 1:
        mask = torch.zeros(n, math.ceil(d_in / 8), dtype=torch.uint8)
        for p in parts:
            mask[p.rows] = p.packed
    return ProjectionInputs(
        name=name, d_in=d_in, kept=per_token(p.kept for p in parts),
        possible=per_token(torch.full_like(p.rows, p.d_in) for p in parts),
        weights_read=per_token(p.kept * p.d_out for p in parts),
        weights_total=per_token(torch.full_like(p.rows, p.d_in * p.d_out) for p in parts), mask=mask)
