"""The figures of a standalone HTML report of one analysis, in page order (firing map, density,
dense vs sparse), all bounded by the figures' cell budget (sam_viz.figures.firing.MAX_CELLS)."""
from __future__ import annotations

from .analysis import Analysis
from .explore import SWEEP_DENSITIES, mass_curve
from .figures.firing import Plot, density_tokens_layers, expert_heatmap, firing_heatmap
from .figures.quality import (activation_histogram, density_per_layer, divergence_plot, mass_curve_plot,
                              next_token_plot, sweep_plot)


def report_plots(a: Analysis, layer: int = 0) -> list[tuple[str, Plot]]:
    layer = min(max(0, layer), a.n_layers - 1)
    plots = [(f"Firing map, layer {layer}", firing_heatmap(a, layer, order="frequency")),
             ("Density per token and layer", density_tokens_layers(a)),
             ("Density per layer", density_per_layer(a))]
    if a.n_experts:
        plots.append((f"Experts picked, layer {layer}", expert_heatmap(a, layer)))
    if a.has_activations:
        plots += [("Distribution of |h|", activation_histogram(a)),
                  ("Mass kept vs density", mass_curve_plot(mass_curve(a, SWEEP_DENSITIES), SWEEP_DENSITIES))]
    if a.sweep:
        plots.append(("Density sweep", sweep_plot(a.sweep, current=a.spec.density)))
    plots += [("Divergence per layer", divergence_plot(a)), ("Dense vs sparse outputs", next_token_plot(a))]
    return plots
