"""`python -m qwen_finetune.report OUTPUT_DIR`: rebuild the report of a run from what it saved."""

from __future__ import annotations

import argparse
import sys

from qwen_finetune.console import VERBOSE_HELP
from qwen_finetune.errors import ToolkitError

from .build import REPORT_DIR, check_report_dependencies, write_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m qwen_finetune.report",
        description="Rebuild OUTPUT_DIR/report.html (and the plots in OUTPUT_DIR/report/) from the run's saved "
        "state: finished, still running, resumed or killed. Reference: docs/reports.md.",
    )
    parser.add_argument("output_dir", help="the --output_dir of a training run")
    parser.add_argument("--verbose", nargs="?", const=True, default=False, help=VERBOSE_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_report_dependencies()
        page = write_report(args.output_dir)
    except ToolkitError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    print(f"report written to {page} (plots in {page.parent / REPORT_DIR})", flush=True)
    return 0
