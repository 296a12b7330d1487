"""The run report: plots, evaluations, sample answers, data report, memory and versions of a run.

API for the trainer (import from the modules: this package file stays empty so that
`python -m qwen_finetune.report` can quiet third-party output before anything heavy is imported):

    callback.ReportCallback()                      # run_info.json at each session start, report at each save
    build.write_report(output_dir) -> Path         # the report of the finished run (after train_summary.json)
    logged_values.extra_log_values(trainer, logs)  # peak memory / perplexity to add to the trainer's logs

`python -m qwen_finetune.report OUTPUT_DIR` (cli.py) rebuilds it from the saved state, for a
finished, a resumed or a killed run. Module map: saved_run (read the output directory) -> series
(logged values) -> plots (PNG) -> page (report.html) -> build (write it all); run_info and
sample_records are files the run writes for the report, logged_values the values it adds to its
logs. docs/reports.md describes the report for users.
"""
