"""report.html: one self-contained page (plots embedded as PNG data URIs, no script, nothing fetched)."""

from __future__ import annotations

import base64
import datetime
import html
import shlex
from collections.abc import Iterable, Sequence
from typing import Any

from qwen_finetune.data.report import format_report

from .logged_values import PEAK_MEMORY_KEY, perplexities
from .sample_records import SampleAnswerRecord
from .saved_run import SavedRun
from .series import Plot, eval_loss_keys, is_number

GIB = 2.0**30

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ddd; padding: 0.25em 0.6em;
  text-align: left; vertical-align: top; } th { background: #f4f4f4; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
pre, .text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.9em; }
pre { background: #f8f8f8; padding: 0.8em; overflow-x: auto; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; } img { max-width: 100%; }
.status { color: #555; } .prompt { margin: 1.5em 0; }
"""


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def byte_size(value: int) -> str:
    return f"{value / GIB:.2f} GiB ({value:,} bytes)"


def format_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_bytes") and isinstance(value, int):
        return byte_size(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "n/a"
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def status_line(run: SavedRun) -> str:
    if run.finished:
        return f"Finished after {run.global_step:,} steps."
    return (
        f"Not finished (still training, or stopped before the end): the newest saved state is at step "
        f"{run.global_step:,} of {run.max_steps:,} ({run.state_file.parent.name}/{run.state_file.name})."
    )


def summary_section(run: SavedRun) -> str:
    if run.summary is None:
        return "<p>No training summary yet: it is written when the run finishes.</p>"
    return table(
        ("train_summary.json", "value"),
        ((key, format_value(key, value)) for key, value in run.summary.items()),
    )


def evaluations_section(run: SavedRun) -> str:
    history = run.log_history
    keys = eval_loss_keys(history)
    evaluations = [entry for entry in history if any(key in entry for key in keys)]
    if not evaluations:
        return "<p>No evaluation in this run (evaluations need --eval_strategy and an eval set).</p>"
    perplexity_keys = [key[: -len("loss")] + "perplexity" for key in keys]
    rows = []
    for entry in evaluations:
        computed = perplexities({key: entry[key] for key in keys if key in entry})
        rows.append(
            [
                entry.get("step", ""),
                format_value("epoch", entry.get("epoch")),
                *(format_value(key, entry.get(key)) for key in keys),
                *(format_value(key, computed.get(key)) for key in perplexity_keys),
            ]
        )
    best = run.state.get("best_model_checkpoint")
    note = f"<p>Best checkpoint: {escape(best)} ({escape(run.state.get('best_metric'))}).</p>" if best else ""
    return table(["step", "epoch", *keys, *perplexity_keys], rows) + note


def plots_section(plots: Sequence[Plot], pngs: dict[str, bytes]) -> str:
    if not plots:
        return "<p>Nothing logged yet.</p>"
    figures = []
    for plot in plots:
        data = base64.b64encode(pngs[plot.name]).decode("ascii")
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{escape(plot.title)}"></figure>'
        )
    return "".join(figures)


def measured_peak(run: SavedRun) -> tuple[int, str] | None:
    if run.summary is not None and "peak_memory_bytes" in run.summary:
        return int(run.summary["peak_memory_bytes"]), str(run.summary.get("peak_memory_kind", "peak"))
    logged = [entry[PEAK_MEMORY_KEY] for entry in run.log_history if is_number(entry.get(PEAK_MEMORY_KEY))]
    return (int(max(logged)), "logged peak so far") if logged else None


def memory_section(run: SavedRun) -> str:
    measured = measured_peak(run)
    plan = run.memory_plan
    if plan is None:
        if measured is None:
            return "<p>No memory measurement yet.</p>"
        return f"<p>Measured peak: {escape(byte_size(measured[0]))} ({escape(measured[1])}).</p>"
    rows: list[Sequence[Any]] = [
        (name, byte_size(int(size))) for name, size in plan.get("components", {}).items()
    ]
    total = int(plan["total_bytes"])
    rows.append(("planned total", byte_size(total)))
    if measured is not None:
        rows.append((f"measured ({measured[1]})", byte_size(measured[0])))
        rows.append(("measured / planned", f"{measured[0] / total:.2f}" if total else "n/a"))
    return table(("memory plan", "bytes"), rows)


def _prompts_of(records: Sequence[SampleAnswerRecord]) -> list[list[SampleAnswerRecord]]:
    grouped: dict[tuple[int, str], list[SampleAnswerRecord]] = {}
    for record in records:
        grouped.setdefault((record.index, record.id), []).append(record)
    return [grouped[key] for key in sorted(grouped)]


def samples_section(run: SavedRun) -> str:
    if not run.samples:
        return "<p>No sample answers (ask for them with --sample_prompts FILE or --eval_samples N).</p>"
    parts = []
    for records in _prompts_of(run.samples):
        first = records[0]
        parts.append(f'<div class="prompt"><h3>{escape(first.id)}</h3>')
        parts.append(f'<div class="text"><b>question:</b> {escape(first.question)}</div>')
        if first.reference is not None:
            parts.append(f'<div class="text"><b>reference:</b> {escape(first.reference)}</div>')
        parts.append(f"<details><summary>whole prompt</summary><pre>{escape(first.prompt)}</pre></details>")
        rows = "".join(
            f'<tr><td class="number">{record.step:,}</td><td class="text">{escape(record.answer)}</td>'
            f'<td class="number">{record.new_tokens}{"" if record.stopped else " (cut)"}</td></tr>'
            for record in records
        )
        parts.append(f"<table><tr><th>step</th><th>answer</th><th>tokens</th></tr>{rows}</table></div>")
    return "".join(parts)


def data_section(run: SavedRun) -> str:
    if run.data_report is None:
        return "<p>No data report (data_stats.json) in the output directory.</p>"
    return f"<pre>{escape(format_report(run.data_report))}</pre>"


def run_section(run: SavedRun) -> str:
    sessions = (run.run_info or {}).get("sessions", [])
    if not sessions:
        return "<p>No run_info.json: the command and versions were not recorded.</p>"
    parts = []
    for session in sessions:
        start = (
            "from the start" if session["start_step"] == 0 else f"resumed at step {session['start_step']:,}"
        )
        parts.append(
            f"<h3>{escape(session['started'])}, {escape(start)}</h3>"
            f"<p>{session['processes']} process(es) on {escape(session['device'])}</p>"
            f"<pre>{escape(shlex.join(session['command']))}</pre>"
            + table(("package", "version"), sorted(session["versions"].items()))
        )
    return "".join(parts)


def render_page(run: SavedRun, plots: Sequence[Plot], pngs: dict[str, bytes]) -> str:
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    sections = [
        ("Summary", summary_section(run)),
        ("Evaluations", evaluations_section(run)),
        ("Training curves", plots_section(plots, pngs)),
        ("Memory", memory_section(run)),
        ("Sample answers", samples_section(run)),
        ("Data", data_section(run)),
        ("Command and versions", run_section(run)),
    ]
    body = "".join(f"<h2>{escape(title)}</h2>{content}" for title, content in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Training report: {escape(run.output_dir.name)}</title><style>{STYLE}</style></head><body>"
        f"<h1>Training report: {escape(run.output_dir.name)}</h1>"
        f'<p class="status">{escape(status_line(run))} Report written {escape(created)} from '
        f"{escape(run.output_dir.resolve())}.</p>{body}</body></html>\n"
    )
