"""Matplotlib figures; every one saved as PNG and SVG (``formats=``: any of PNG, SVG, PDF) next
to a CSV of the numbers it draws.

figures        save_figure, write_csv, line styles (teacher dashed, rectified solid), FORMATS
schedules      plot_schedules, plot_implied_weighting
trajectories   plot_curvature, plot_x0_drift, plot_quality_vs_nfe, plot_trajectories_xy
samples        plot_samples, image_grid
training       plot_loss_logs (loss, learning rate, gradient norm, ESS from loss_log.csv)
"""

from __future__ import annotations

from .figures import FIGURE_FORMATS, FORMATS, line_styles, save_figure, write_csv
from .samples import image_grid, plot_samples
from .schedules import plot_implied_weighting, plot_schedules
from .training import plot_loss_logs
from .trajectories import plot_curvature, plot_quality_vs_nfe, plot_trajectories_xy, plot_x0_drift

__all__ = [
    "FORMATS", "FIGURE_FORMATS", "save_figure", "write_csv", "line_styles", "plot_schedules", "plot_implied_weighting",
    "plot_curvature", "plot_x0_drift", "plot_quality_vs_nfe", "plot_trajectories_xy",
    "plot_samples", "image_grid", "plot_loss_logs",
]  # fmt: skip
