"""The run report: its plots carry exactly the logged series (series.json and the figures' own data
against trainer_state.json), it shows evaluations, the memory plan against the measured peak, the
sample answers, the data report and the versions; a killed run is reported from its newest
checkpoint, and a killed then resumed run covers every step once; the page renders in headless
Chromium with every image loaded; `python -m qwen_finetune.report` rebuilds it quietly."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import run_report_helpers as reporting
import torch
import train_helpers as helpers

from qwen_finetune.data import DataArguments, make_supervised_data
from qwen_finetune.json_files import write_json
from qwen_finetune.model_loading import load_tokenizer
from qwen_finetune.report import cli
from qwen_finetune.report.build import REPORT_DIR, REPORT_PAGE, SERIES_FILE, write_report
from qwen_finetune.report.plots import DOTS_PER_INCH, FIGURE_INCHES, figure_of
from qwen_finetune.report.run_info import record_session, session_info
from qwen_finetune.report.sample_records import SampleAnswerRecord, write_sample_answers
from qwen_finetune.report.series import plots_of

PLOTTED_KEYS = {"loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_bytes"}
GIB = 2**30


def logged_history(steps: int, eval_every: int) -> list[dict[str, Any]]:
    """A log history as the trainer writes it: a training log per step, an evaluation every
    `eval_every` steps, the final training metrics."""
    history: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        history.append(
            {
                "step": step,
                "epoch": step / 4,
                "loss": 3.0 - 0.1 * step,
                "learning_rate": 1e-3 * (1 - step / (2 * steps)),
                "grad_norm": 1.0 + 0.05 * step,
                "tokens_seen": 100 * step,
                "supervised_tokens_seen": 40 * step,
                "tokens_per_second": 500.0 + step,
                "peak_memory_bytes": GIB + step * 2**20,
            }
        )
        if step % eval_every == 0:
            history.append(
                {"step": step, "epoch": step / 4, "eval_loss": 2.5 - 0.1 * step, "eval_runtime": 0.1}
            )
    history.append({"step": steps, "epoch": steps / 4, "train_loss": 2.7, "train_runtime": 3.2})
    return history


def write_state(directory: Path, history: list[dict[str, Any]], max_steps: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    steps = [entry["step"] for entry in history]
    state = {
        "log_history": history,
        "global_step": max(steps),
        "max_steps": max_steps,
        "best_model_checkpoint": None,
    }
    write_json(directory / "trainer_state.json", state)


@pytest.fixture(scope="module")
def data_report_dir(tiny_chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the data_stats.json of the facts, as a run writes it."""
    directory = tmp_path_factory.mktemp("data-report")
    data = helpers.write_memorisable_data(directory / "facts.json")
    tokenizer = load_tokenizer(tiny_chat_checkpoint, helpers.MAX_LENGTH)
    data_args = DataArguments(
        data_path=str(data), eval_split_ratio=0.25, data_cache_dir=str(directory / "cache")
    )
    make_supervised_data(data_args, tokenizer, helpers.MAX_LENGTH, output_dir=directory)
    return directory


def finished_run(
    output: Path, data_report_dir: Path, steps: int = 8, eval_every: int = 2
) -> list[dict[str, Any]]:
    """A finished run's output directory: state, summary, data report, run info, sample answers."""
    history = logged_history(steps, eval_every)
    write_state(output, history, steps)
    summary = {
        "mode": "lora",
        "global_steps": steps,
        "peak_memory_bytes": 3 * GIB // 2,
        "peak_memory_kind": "peak RSS",
    }
    write_json(output / "train_summary.json", summary)
    shutil.copy(data_report_dir / "data_stats.json", output / "data_stats.json")
    record_session(output, session_info(0, 1, torch.device("cpu")))
    records = [
        SampleAnswerRecord(
            step, step / 4, 0, "fact0", "What colour is the sky?", "<|im_start|>...", "Blue.", answer, 3, True
        )
        for step, answer in ((2, "Green <b>not bold</b>"), (8, "Blue."))
    ]
    write_sample_answers(output / "sample_answers.jsonl", records)
    return history


def logged(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    entries = [entry for entry in history if key in entry]
    return [entry["step"] for entry in entries], [entry[key] for entry in entries]


def assert_plots_carry(output: Path, history: list[dict[str, Any]]) -> None:
    """series.json beside the PNGs, and the figures drawn from the history, hold exactly its values."""
    saved = json.loads((output / REPORT_DIR / SERIES_FILE).read_text())
    keys = set()
    for plot in saved.values():
        for series in plot["series"].values():
            keys.add(series["key"])
            assert (series["steps"], series["values"]) == logged(history, series["key"]), series["key"]
    assert keys == PLOTTED_KEYS
    for plot in plots_of(history):
        lines = figure_of(plot).axes[0].lines
        assert len(lines) == len(plot.series)
        for line, series in zip(lines, plot.series):
            steps, values = logged(history, series.key)
            assert line.get_xdata().tolist() == steps
            assert line.get_ydata().tolist() == pytest.approx(
                [value / plot.scale for value in values], rel=1e-12
            )
        assert saved[plot.name]["scale"] == plot.scale
    assert saved["memory"]["scale"] == GIB


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]


def test_plots_carry_the_logged_series(tmp_path, data_report_dir):
    history = finished_run(tmp_path, data_report_dir)
    page = write_report(tmp_path)
    assert page == tmp_path / REPORT_PAGE
    assert_plots_carry(tmp_path, history)
    images = embedded_images(page.read_text(encoding="utf-8"))
    files = sorted((tmp_path / REPORT_DIR).glob("*.png"))
    assert [path.stem for path in files] == sorted(
        ["loss", "learning_rate", "grad_norm", "tokens_per_second", "memory"]
    )
    assert sorted(images) == sorted(path.read_bytes() for path in files)  # the page embeds the same PNGs
    from matplotlib.image import imread

    for path in files:
        height, width = imread(path).shape[:2]
        assert (width, height) == (FIGURE_INCHES[0] * DOTS_PER_INCH, FIGURE_INCHES[1] * DOTS_PER_INCH)


def test_preference_runs_get_reward_plots_with_their_logged_values():
    history: list[dict[str, Any]] = []
    for step in (1, 2, 3, 4):
        history.append(
            {
                "step": step,
                "loss": 0.7 - 0.1 * step,
                "rewards/chosen": 0.01 * step,
                "rewards/rejected": -0.02 * step,
                "rewards/margins": 0.03 * step,
                "rewards/accuracies": 0.25 * step,
            }
        )
    history.append(
        {"step": 4, "eval_loss": 0.3, "eval_rewards/margins": 0.11, "eval_rewards/accuracies": 0.875}
    )
    plots = {plot.name: plot for plot in plots_of(history)}
    assert [series.key for series in plots["rewards"].series] == [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "eval_rewards/margins",
    ]
    assert [series.key for series in plots["reward_accuracy"].series] == [
        "rewards/accuracies",
        "eval_rewards/accuracies",
    ]
    for name in ("rewards", "reward_accuracy"):
        for line, series in zip(figure_of(plots[name]).axes[0].lines, plots[name].series):
            assert (line.get_xdata().tolist(), line.get_ydata().tolist()) == logged(history, series.key)
    supervised = [{key: value for key, value in entry.items() if "rewards" not in key} for entry in history]
    assert not {"rewards", "reward_accuracy"} & {plot.name for plot in plots_of(supervised)}


def test_page_shows_evaluations_plan_answers_data_and_versions(tmp_path, data_report_dir):
    finished_run(tmp_path, data_report_dir)
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "Finished after 8 steps." in page
    assert "<td>2.3</td><td>9.974</td>" in page  # step 2: eval_loss 2.3, perplexity exp(2.3)
    assert "No memory plan" not in page and "memory plan" not in page
    assert "Measured peak: 1.50 GiB (1,610,612,736 bytes) (peak RSS)." in page
    assert "Green &lt;b&gt;not bold&lt;/b&gt;" in page and "<b>not bold</b>" not in page
    assert "<b>reference:</b> Blue." in page
    assert "Data report (model_max_length 64" in page and "eval: 2 samples read, 2 kept" in page
    assert f"<td>torch</td><td>{torch.__version__}</td>" in page
    assert "pytest" in page  # the command of the session: this test process

    write_json(
        tmp_path / "memory_plan.json",
        {"total_bytes": 2 * GIB, "components": {"weights": GIB, "activations": GIB}},
    )
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "<td>weights</td><td>1.00 GiB (1,073,741,824 bytes)</td>" in page
    assert "<td>planned total</td><td>2.00 GiB (2,147,483,648 bytes)</td>" in page
    assert "<td>measured / planned</td><td>0.75</td>" in page


def test_a_killed_run_is_reported_from_its_newest_checkpoint(tmp_path, data_report_dir):
    history = logged_history(6, 2)[:-1]  # killed: no final metrics
    old_finished_run = tmp_path / "trainer_state.json"
    write_state(
        tmp_path, logged_history(3, 3), 3
    )  # an earlier run in this directory (--overwrite_output_dir)
    for step in (2, 4):
        write_state(tmp_path / f"checkpoint-{step}", [entry for entry in history if entry["step"] <= step], 6)
    (tmp_path / "checkpoint-6").mkdir()  # a save cut short: no trainer_state.json
    os.utime(old_finished_run, (1, 1))
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "Not finished" in page and "step 4 of 6 (checkpoint-4/trainer_state.json)" in page
    saved = json.loads((tmp_path / REPORT_DIR / SERIES_FILE).read_text())
    assert saved["loss"]["series"]["train loss"]["steps"] == [1, 2, 3, 4]
    assert saved["loss"]["series"]["eval loss"]["steps"] == [2, 4]
    assert "Measured peak: 1.00 GiB (1,077,936,128 bytes) (logged peak so far)." in page


def test_the_command_rebuilds_the_report_and_says_what_is_missing(tmp_path, data_report_dir, capsys):
    assert cli.main([str(tmp_path)]) == 2
    assert "holds no trainer_state.json" in capsys.readouterr().err
    history = finished_run(tmp_path, data_report_dir)
    assert cli.main([str(tmp_path)]) == 0
    assert (
        capsys.readouterr().out
        == f"report written to {tmp_path / REPORT_PAGE} (plots in {tmp_path / REPORT_DIR})\n"
    )
    assert_plots_carry(tmp_path, history)


# ------------------------------------------------------------------------------------------- browser

PROBE = """<pre id="probe"></pre><script>
window.addEventListener("load", () => {
  const images = [...document.images].map((image) => ({
    alt: image.alt, complete: image.complete, width: image.naturalWidth, height: image.naturalHeight }));
  document.getElementById("probe").textContent = JSON.stringify(images);
});
</script></body>"""


def rendered_images(page: Path, directory: Path) -> list[dict[str, Any]]:
    """Load a copy of `page` in headless Chromium (with a probe script added to the copy: the report
    itself has no script) and return each image's natural size after the page loaded."""
    chromium = shutil.which("chromium")
    if chromium is None:
        message = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    probe = directory / "probe.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE), encoding="utf-8")
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={directory / 'chromium-profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    match = re.search(r'<pre id="probe">(.*?)</pre>', completed.stdout, re.S)
    assert match and match.group(1), f"the probe did not run:\n{completed.stdout[-2000:]}"
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def assert_renders_with_every_image(page: Path, directory: Path) -> None:
    images = rendered_images(page, directory)
    assert len(images) == len(embedded_images(page.read_text(encoding="utf-8"))) > 0
    for image in images:
        assert image["complete"] and image["width"] == FIGURE_INCHES[0] * DOTS_PER_INCH, image
        assert image["height"] == FIGURE_INCHES[1] * DOTS_PER_INCH, image


def test_the_page_renders_in_chromium_with_every_image_loaded(tmp_path, data_report_dir):
    finished_run(tmp_path / "run", data_report_dir)
    assert_renders_with_every_image(write_report(tmp_path / "run"), tmp_path)


# ------------------------------------------------------------------------------------- killed, resumed


def steps_of(output: Path, key: str) -> list[int]:
    return [entry["step"] for entry in helpers.log_history(output) if key in entry]


@pytest.mark.slow
def test_a_killed_then_resumed_run_is_reported_with_every_step_once(tiny_chat_checkpoint, tmp_path):
    """6 steps, an evaluation with sample answers at every step, a checkpoint at step 4, killed at the
    end of step 6 (step 5 was evaluated and answered, after the checkpoint), then resumed."""
    data = helpers.write_memorisable_data(tmp_path / "facts.json")
    questions = reporting.write_questions(tmp_path / "questions.txt")
    output = tmp_path / "run"
    argv = reporting.flags(
        tiny_chat_checkpoint,
        data,
        output,
        tmp_path / "cache",
        steps=6,
        eval_steps=1,
        extra=[
            "--save_strategy",
            "steps",
            "--save_steps",
            "4",
            "--sample_prompts",
            str(questions),
            "--sample_max_new_tokens",
            "4",
        ],
    )
    runner = helpers.write_kill_runner(tmp_path)
    env = helpers.subprocess_env(KILL_AT_STEP="6")
    helpers.run_killed([helpers.PYTHON, str(runner), *argv], env=env)
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-4"]
    killed_answers = {(record["step"], record["index"]) for record in reporting.sample_records(output)}
    assert killed_answers == {(step, index) for step in range(1, 6) for index in range(3)}

    rebuilt = helpers.run([helpers.PYTHON, "-m", "qwen_finetune.report", str(output)])
    assert (
        rebuilt == f"report written to {output / REPORT_PAGE} (plots in {output / REPORT_DIR})\n"
    )  # nothing else
    killed_page = (output / REPORT_PAGE).read_text(encoding="utf-8")
    assert "Not finished" in killed_page and "step 4 of 6 (checkpoint-4/trainer_state.json)" in killed_page
    killed_history = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert_plots_carry(output, killed_history)

    helpers.run(
        [helpers.PYTHON, str(runner), *argv, "--resume_from_checkpoint", "latest"],
        env=helpers.subprocess_env(),
    )
    page = (output / REPORT_PAGE).read_text(encoding="utf-8")
    assert "Finished after 6 steps." in page
    history = helpers.log_history(output)
    assert steps_of(output, "loss") == steps_of(output, "eval_loss") == [1, 2, 3, 4, 5, 6]
    assert_plots_carry(output, history)
    answers = [(record["step"], record["index"]) for record in reporting.sample_records(output)]
    assert answers == [(step, index) for step in range(1, 7) for index in range(3)]
    for step in range(1, 7):
        assert page.count(f'<tr><td class="number">{step}</td>') == 3  # one row per prompt
    sessions = json.loads((output / "run_info.json").read_text())["sessions"]
    assert [session["start_step"] for session in sessions] == [0, 4]
    assert not list(output.rglob("events.out.tfevents.*")), "--report_to none writes no TensorBoard files"
    assert_renders_with_every_image(output / REPORT_PAGE, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_load_best_model_at_end_saves_the_best_checkpoint_and_the_report_names_it(
    method, tiny_chat_checkpoint, tmp_path
):
    """The 'best' checkpoint is the one with the highest eval loss here (--greater_is_better True),
    so that it is not the last one: the saved model must be checkpoint-2, not the trained-on one."""
    data = helpers.write_memorisable_data(tmp_path / "facts.json")
    output = tmp_path / method
    argv = reporting.flags(
        tiny_chat_checkpoint,
        data,
        output,
        tmp_path / "cache",
        steps=4,
        eval_steps=2,
        method=method,
        extra=[
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--load_best_model_at_end",
            "True",
            "--metric_for_best_model",
            "eval_loss",
            "--greater_is_better",
            "True",
            # a slow, mask-free descent, so that the eval loss falls from step 2 to step 4 (LoRA: 11.45 to
            # 11.29); at the suite's memorising rate LoRA's eval loss can rise by then, depending on its masks
            "--learning_rate",
            "3e-3",
            "--lora_dropout",
            "0",
        ],
    )
    helpers.run([helpers.PYTHON, str(helpers.FINETUNE_PY), *argv], env=helpers.subprocess_env())
    evaluations = {
        entry["step"]: entry["eval_loss"] for entry in helpers.log_history(output) if "eval_loss" in entry
    }
    assert sorted(evaluations) == [2, 4] and evaluations[2] > evaluations[4]
    batch = helpers.encoded_batch(tiny_chat_checkpoint, data, tmp_path / "cache")
    saved = helpers.mean_supervised_loss(helpers.load_artifact(output), batch)
    assert saved == pytest.approx(evaluations[2], rel=1e-5)
    page = (output / REPORT_PAGE).read_text(encoding="utf-8")
    assert f"Best checkpoint: {output / 'checkpoint-2'} ({evaluations[2]})." in page
