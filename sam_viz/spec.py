"""RunSpec: everything that determines an analysis, validated once where it is built.

It comes from CLI flags, URL query params or a saved run; all of those are untrusted, so every
field is checked here and a bad one raises InputError with one sentence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sam_viz.models import DEFAULT_MODEL, InputError
from sam_viz.sparse_ops import (KERNELS, POLICIES, Policy, available_kernels, default_kernel, parse_density,
                        unavailable_kernels)

MAX_PROMPT_CHARS = 20_000


def positive_int(value, name: str) -> int:
    """A whole number > 0 from an untrusted flag or field (`name` is how the user calls it)."""
    try:
        n = int(str(value).strip())
    except ValueError:
        raise InputError(f"{name} must be a positive whole number, got '{str(value)[:40]}'") from None
    if n <= 0:
        raise InputError(f"{name} must be a positive whole number, got {n}")
    return n


@dataclass(frozen=True)
class RunSpec:
    prompt: str
    model: str = DEFAULT_MODEL
    policy: str = "topk"
    density: float = 0.5
    kernel: str = field(default_factory=default_kernel)     # cpu where it is built, else reference
    scope: str = "mlp"                                      # mlp: the MLP's neurons; all: every projection's input
    allocation: str = "greedy"                              # teal / wina: uniform or greedy

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InputError("prompt is empty; type some text to analyze")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InputError(f"prompt is {len(self.prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise InputError("model is empty; name a model spec")
        if self.policy not in POLICIES:
            raise InputError(f"unknown policy '{str(self.policy)[:40]}'; choose one of {', '.join(POLICIES)}")
        if not isinstance(self.kernel, str) or self.kernel not in KERNELS:
            raise InputError(f"unknown kernel '{str(self.kernel)[:40]}'; available here: "
                             f"{', '.join(available_kernels())}")
        why = unavailable_kernels().get(self.kernel)
        if why:
            raise InputError(f"the {self.kernel} kernel cannot run here: {why}")
        object.__setattr__(self, "density", parse_density(self.density))
        self.to_policy()                                    # scope, allocation, and the policy under the scope

    def to_policy(self) -> Policy:
        return Policy(self.policy, self.density, scope=self.scope, allocation=self.allocation)
