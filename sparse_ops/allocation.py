"""How a block's density budget is spread over its projections (TEAL's block-wise greedy,
`teal/greedyopt.py`), as a pure function over an error callable, so it runs without a model.

Every projection p starts at density 1. Each step lowers one projection's own density by `step`:
the one whose step adds the least block error per weight saved, (error(after) - error(now)) / w_p
with w_p = d_out * d_in its weight count (the step is the same for all, so per weight saved is per
w_p); ties go to the projection named first. Steps stop when no projection can take one more
step without passing below `floor`. The path (the state after every step) is kept, and the
allocation for any target is read off it:

- the block's weighted density is sum_p w_p d_p / sum_p w_p (the share of its weights read);
- for a target T, the first state on the path at or below T; when it jumps past T, the state
  before it with the projection that step moved lowered only part of the way, so that the weighted
  density is exactly T (that projection's density is then between two grid points);
- a target below the last state gets the last state.

When the error is a sum of per-projection terms whose step costs are >= 0 and grow as the density
falls (convex along the grid), the greedy takes the moves in increasing order of cost per weight,
so every state on the path minimises error + lambda * weighted density over the grid for some
lambda >= 0: no grid state of equal or lower weighted density has a lower error
(tests/test_input_calibration.py checks this by brute force). For other errors it is what TEAL
does: at each step the locally best move (the test checks each choice against its own enumeration
of the one-step moves), with no guarantee of the optimum.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

ErrorFn = Callable[[dict[str, float]], float]


@dataclass(frozen=True)
class GreedyPath:
    names: tuple[str, ...]
    weights: tuple[int, ...]                    # weight count of each projection (d_out * d_in)
    densities: tuple[tuple[float, ...], ...]    # [steps + 1][projection]: the state after each step
    errors: tuple[float, ...]                   # [steps + 1]: the error of each state
    moved: tuple[int, ...]                      # [steps]: which projection each step lowered

    def weighted(self, i: int) -> float:
        """Weighted density of state i."""
        return weighted_density(self.densities[i], self.weights)

    def at(self, target: float) -> dict[str, float]:
        """Per-projection densities whose weighted density is `target` (see the module docstring)."""
        total = sum(self.weights)
        for i in range(len(self.densities)):
            w = self.weighted(i)
            if w <= target + 1e-12:
                if i == 0 or abs(w - target) <= 1e-12:
                    return dict(zip(self.names, self.densities[i]))
                before = list(self.densities[i - 1])
                p = self.moved[i - 1]
                before[p] -= (self.weighted(i - 1) - target) * total / self.weights[p]
                return dict(zip(self.names, before))
        return dict(zip(self.names, self.densities[-1]))


def weighted_density(densities, weights) -> float:
    return sum(w * d for w, d in zip(weights, densities)) / sum(weights)


def greedy_path(error: ErrorFn, weights: dict[str, int], step: float = 0.05, floor: float = 0.05,
                on_step: Callable[[int, int], None] | None = None) -> GreedyPath:
    """Run the greedy from all-dense to all-at-`floor`; `on_step(i, n)` reports progress."""
    names = tuple(weights)
    w = tuple(int(weights[p]) for p in names)
    top = int((1.0 - floor) / step + 1e-9)                 # steps each projection can take
    levels = [0] * len(names)

    def state(lv) -> dict[str, float]:
        return {p: round(1.0 - n * step, 10) for p, n in zip(names, lv)}

    now = error(state(levels))
    densities, errors, moved = [tuple(state(levels).values())], [now], []
    n_steps = top * len(names)
    for i in range(n_steps):
        if on_step is not None:
            on_step(i, n_steps)
        best = None
        for p in range(len(names)):
            if levels[p] >= top:
                continue
            trial = levels[:p] + [levels[p] + 1] + levels[p + 1:]
            e = error(state(trial))
            if best is None or (e - now) / w[p] < (best[1] - now) / w[best[0]]:
                best = (p, e)
        levels[best[0]] += 1
        now = best[1]
        densities.append(tuple(state(levels).values()))
        errors.append(now)
        moved.append(best[0])
    return GreedyPath(names, w, tuple(densities), tuple(errors), tuple(moved))
