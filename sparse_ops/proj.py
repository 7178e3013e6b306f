"""One linear projection of a block in canonical layout, for the whole-model scope (DESIGN.md,
"Sparsity on every projection"): the weights the input kernels (sparse_ops/kernels.py) read, as
MLPWeights (models/adapters.py) are the MLP kernels'."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProjWeights:
    """y = x @ weight.T + bias, as views of the model's own parameters (no copies). GPT-2's Conv1D
    stores its weight [in, out]: the caller passes weight.t()."""
    weight: torch.Tensor                   # [d_out, d_in]
    bias: torch.Tensor | None = None       # [d_out]

    def __post_init__(self):
        if self.weight.dim() != 2 or (self.bias is not None and tuple(self.bias.shape) != (self.weight.shape[0],)):
            raise ValueError(f"ProjWeights wants weight [d_out, d_in] and bias [d_out], not {tuple(self.weight.shape)} "
                             f"and {None if self.bias is None else tuple(self.bias.shape)}")

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]
