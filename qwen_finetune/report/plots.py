"""PNG plots of the logged series (matplotlib, imported only here, drawn without pyplot's global state)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from .series import Plot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGURE_INCHES = (5.2, 3.0)  # two side by side on the page
DOTS_PER_INCH = 100
MARKED_POINTS = 60  # series with at most this many points also mark each one


def figure_of(plot: Plot) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=FIGURE_INCHES, dpi=DOTS_PER_INCH)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for series in plot.series:
        axes.plot(
            series.steps,
            [value / plot.scale for value in series.values],
            marker="o" if len(series.steps) <= MARKED_POINTS else None,
            markersize=3,
            label=series.label,
        )
    axes.set_title(plot.title)
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(plot.ylabel)
    axes.grid(alpha=0.3)
    if len(plot.series) > 1:
        axes.legend()
    figure.tight_layout()
    return figure


def png_of(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
