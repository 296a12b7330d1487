"""Write the run report from what the output directory holds: report.html, and report/ beside it
with each plot as a PNG file and series.json (the plotted values, for other tools and for tests)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from qwen_finetune.errors import ToolkitError
from qwen_finetune.json_files import write_json
from qwen_finetune.staging import staged_output_dir

from .files import write_atomically
from .page import render_page
from .plots import figure_of, png_of
from .saved_run import read_saved_run
from .series import plots_of, series_json

REPORT_PAGE = "report.html"
REPORT_DIR = "report"
SERIES_FILE = "series.json"


def check_report_dependencies() -> None:
    """Fail before training, not at its first save, when the plots cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ToolkitError(
            "the run report needs matplotlib, which is not installed; "
            "it is a dependency of the package: reinstall it with `pip install -c constraints.txt -e .`"
        )


def write_report(output_dir: str | os.PathLike) -> Path:
    """(Re)build the report of the run in `output_dir`; returns the path of report.html.

    Works for a finished run, one in progress and a killed one (see saved_run.py); raises
    InputFileError when the directory holds no training state."""
    run = read_saved_run(output_dir)
    plots = plots_of(run.log_history)
    pngs = {plot.name: png_of(figure_of(plot)) for plot in plots}
    with staged_output_dir(run.output_dir / REPORT_DIR, overwrite=True) as staging:
        for name, data in pngs.items():
            (staging / f"{name}.png").write_bytes(data)
        write_json(staging / SERIES_FILE, series_json(plots))
    page = run.output_dir / REPORT_PAGE
    write_atomically(page, render_page(run, plots, pngs))
    return page
