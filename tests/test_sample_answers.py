"""Sample answers at each evaluation: prompts from questions, conversations and the eval set encoded
as the chat prompt (`make_context`) and the training data are; batched greedy answers equal to
`model.chat` one prompt at a time; during training, each prompt answered once per evaluation by the
model of that step (compared with the checkpoint of the step, reloaded), in the log, the records and
TensorBoard; under ZeRO-3 on two processes, written once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import run_report_helpers as reporting
import torch
import train_helpers as helpers
from transformers import TrainerState

from qwen_finetune.data import DataArguments, DataError, make_supervised_data
from qwen_finetune.errors import ArgumentError
from qwen_finetune.model_loading import load_tokenizer
from qwen_finetune.report.sample_records import SampleAnswerRecord, read_sample_answers, write_sample_answers
from qwen_finetune.sample_answers import (
    SampleAnswersCallback,
    SampleArguments,
    SamplePrompt,
    build_sample_prompts,
    generate_answers,
)
from qwen_model.chat_format import DEFAULT_SYSTEM_PROMPT
from qwen_model.qwen_generation_utils import make_context

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_checkpoint: Path) -> Any:
    return load_tokenizer(tiny_chat_checkpoint, helpers.MAX_LENGTH)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sample-answers")


@pytest.fixture(scope="module")
def data_file(workdir: Path) -> Path:
    return helpers.write_memorisable_data(workdir / "facts.json")


def prompts_of(
    tokenizer: Any,
    *,
    sample_prompts: str | None = None,
    eval_samples: int = 0,
    eval_set: Any = None,
    evaluates: bool = True,
    system_message: str = DEFAULT_SYSTEM_PROMPT,
) -> list[SamplePrompt]:
    options = DataArguments(system_message=system_message).encoding_options(helpers.MAX_LENGTH)
    sample_args = SampleArguments(sample_prompts=sample_prompts, eval_samples=eval_samples)
    return build_sample_prompts(sample_args, tokenizer, options, eval_set, evaluates=evaluates)


def chat_prompt(
    tokenizer: Any, query: str, history=(), system: str = DEFAULT_SYSTEM_PROMPT
) -> tuple[int, ...]:
    return tuple(make_context(tokenizer, query, list(history), system)[1])


# ------------------------------------------------------------------------------------------ prompts


def test_questions_one_per_line_or_as_a_json_list_are_chat_prompts(tokenizer, tmp_path):
    lines = reporting.write_questions(tmp_path / "questions.txt")
    listed = tmp_path / "questions.json"
    listed.write_text(json.dumps(reporting.QUESTIONS), encoding="utf-8")
    for path in (lines, listed):
        prompts = prompts_of(tokenizer, sample_prompts=str(path))
        assert [prompt.question for prompt in prompts] == reporting.QUESTIONS
        assert [prompt.id for prompt in prompts] == [f"{path.name}:{index}" for index in range(3)]
        for prompt, question in zip(prompts, reporting.QUESTIONS):
            assert prompt.input_ids == chat_prompt(tokenizer, question)
            assert prompt.reference is None
            assert prompt.prompt_text == make_context(tokenizer, question)[0]


def test_conversations_in_any_format_keep_history_and_system_and_show_the_last_answer(tokenizer, tmp_path):
    qwen = tmp_path / "conversations.json"
    qwen.write_text(
        json.dumps(
            [
                {
                    "id": "two-turns",
                    "conversations": [
                        {"from": "user", "value": "Hi"},
                        {"from": "assistant", "value": "Hello!"},
                        {"from": "user", "value": "Name a fruit."},
                        {"from": "assistant", "value": "Apple."},
                    ],
                },
                {
                    "id": "open-question",
                    "conversations": [
                        {"from": "user", "value": "Hi"},
                        {"from": "assistant", "value": "Hello!"},
                        {"from": "user", "value": "And now?"},
                    ],
                },
            ]
        ),
        encoding="utf-8",
    )
    openai = tmp_path / "messages.jsonl"
    message = {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Sky colour?"},
            {"role": "assistant", "content": "Blue."},
        ]
    }
    openai.write_text(json.dumps(message) + "\n", encoding="utf-8")

    two_turns, open_question = prompts_of(tokenizer, sample_prompts=str(qwen))
    assert two_turns.id == "two-turns" and two_turns.reference == "Apple."
    assert two_turns.input_ids == chat_prompt(tokenizer, "Name a fruit.", [("Hi", "Hello!")])
    assert open_question.reference is None
    assert open_question.input_ids == chat_prompt(tokenizer, "And now?", [("Hi", "Hello!")])
    (with_system,) = prompts_of(tokenizer, sample_prompts=str(openai))
    assert with_system.input_ids == chat_prompt(tokenizer, "Sky colour?", system="Answer in one word.")
    assert (with_system.question, with_system.reference) == ("Sky colour?", "Blue.")
    (other_default,) = prompts_of(
        tokenizer, sample_prompts=str(lines_file(tmp_path)), system_message="Be brief."
    )
    assert other_default.input_ids == chat_prompt(tokenizer, "Why?", system="Be brief.")


def lines_file(directory: Path) -> Path:
    path = directory / "why.txt"
    path.write_text("\nWhy?\n\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def eval_set(tokenizer, data_file, workdir) -> Any:
    """The kept eval samples of the facts, as the trainer gets them."""
    data_args = DataArguments(
        data_path=str(data_file), eval_data_path=str(data_file), data_cache_dir=str(workdir / "cache")
    )
    return make_supervised_data(data_args, tokenizer, helpers.MAX_LENGTH).eval_samples


def test_eval_samples_are_cut_before_their_last_answer(tokenizer, eval_set):
    prompts = prompts_of(tokenizer, eval_samples=3, eval_set=eval_set)
    for index, prompt in enumerate(prompts):
        question, answer = helpers.FACTS[index]
        assert (prompt.id, prompt.question, prompt.reference) == (f"fact{index}", question, answer)
        assert prompt.input_ids == chat_prompt(tokenizer, question)
        sample_ids = list(eval_set[index]["input_ids"])
        assert sample_ids[: len(prompt.input_ids)] == list(prompt.input_ids)

    answer_ids = [*tokenizer.encode_text("Blue."), tokenizer.im_end_id, *tokenizer.encode_text("\n")]
    pair = {"id": "pair0", "prompt_ids": list(chat_prompt(tokenizer, "Sky?")), "chosen_ids": answer_ids}
    (from_pair,) = prompts_of(tokenizer, eval_samples=1, eval_set=[pair])  # a preference run's eval set
    assert from_pair.input_ids == chat_prompt(tokenizer, "Sky?")
    assert (from_pair.question, from_pair.reference) == ("Sky?", "Blue.")

    with pytest.raises(
        ArgumentError, match="--eval_samples 9: the eval set has 8 samples; ask for at most 8"
    ):
        prompts_of(tokenizer, eval_samples=9, eval_set=eval_set)
    with pytest.raises(ArgumentError, match="give an eval set with --eval_data_path or --eval_split_ratio"):
        prompts_of(tokenizer, eval_samples=1, eval_set=None)


def test_bad_prompt_files_and_flags_fail_with_what_to_do(tokenizer, tmp_path):
    with pytest.raises(DataError, match="file not found.*--sample_prompts"):
        prompts_of(tokenizer, sample_prompts=str(tmp_path / "missing.txt"))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="no question"):
        prompts_of(tokenizer, sample_prompts=str(blank))
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(["Why?", {"conversations": []}]), encoding="utf-8")
    with pytest.raises(DataError, match="mixes questions") as error:
        prompts_of(tokenizer, sample_prompts=str(mixed))
    assert error.value.index == 1
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(["Why?", "  "]), encoding="utf-8")
    with pytest.raises(DataError, match="the question is empty"):
        prompts_of(tokenizer, sample_prompts=str(empty))
    with pytest.raises(ArgumentError, match="never evaluates; add --eval_strategy steps"):
        prompts_of(tokenizer, sample_prompts=str(lines_file(tmp_path)), evaluates=False)
    assert prompts_of(tokenizer, evaluates=False) == []  # nothing asked for, nothing to check
    with pytest.raises(ArgumentError, match="--eval_samples -1 must be >= 0"):
        SampleArguments(eval_samples=-1)
    with pytest.raises(ArgumentError, match="--sample_max_new_tokens 0 must be >= 1"):
        SampleArguments(sample_max_new_tokens=0)


# ------------------------------------------------------------------------------------------- answers


def chat_answers(model: Any, tokenizer: Any, questions: list[str]) -> list[str]:
    """The reference: the model's own chat(), one question at a time, greedy."""
    return [
        model.chat(
            tokenizer, question, do_sample=False, repetition_penalty=1.0, max_new_tokens=MAX_NEW_TOKENS
        )[0]
        for question in questions
    ]


def alone_answers(model: Any, tokenizer: Any, prompts: list[SamplePrompt]) -> list[str]:
    """The reference for prompts that are not plain questions: generate() on each prompt alone."""
    texts = []
    stop_ids = [tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id]
    model.eval()
    for prompt in prompts:
        input_ids = torch.tensor([prompt.input_ids])
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                repetition_penalty=1.0,
                max_new_tokens=MAX_NEW_TOKENS,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.eod_id,
                suppress_tokens=list(range(len(tokenizer), model.config.vocab_size)),
            )
        generated = output[0, input_ids.shape[1] :].tolist()
        end = next(
            (position for position, token in enumerate(generated) if token in stop_ids), len(generated)
        )
        texts.append(tokenizer.decode(generated[:end], errors="replace").strip())
    return texts


def test_batched_greedy_answers_equal_chat_one_question_at_a_time(tiny_chat_checkpoint, tokenizer):
    model = helpers.load_artifact(tiny_chat_checkpoint)
    questions = ["Hi", *reporting.QUESTIONS, "What is the capital of France? Answer in one long sentence."]
    prompts = [chat_prompt(tokenizer, question) for question in questions]
    model.train()
    answers = generate_answers(
        model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, batch_size=3, device=torch.device("cpu")
    )
    assert model.training, "the model must go back to training mode"
    assert [answer.text for answer in answers] == chat_answers(model, tokenizer, questions)
    assert any(answer.text for answer in answers), "a random model says something"
    for answer in answers:
        assert answer.stopped or answer.new_tokens == MAX_NEW_TOKENS
    model.eval()
    generate_answers(
        model, tokenizer, prompts[:1], max_new_tokens=2, batch_size=1, device=torch.device("cpu")
    )
    assert not model.training


def test_a_resumed_run_keeps_the_answers_up_to_its_checkpoint(tmp_path, tokenizer):
    def record(step: int) -> SampleAnswerRecord:
        return SampleAnswerRecord(step, step / 4, 0, "q", "Why?", "prompt", None, f"at {step}", 2, True)

    write_sample_answers(tmp_path / "sample_answers.jsonl", [record(step) for step in (2, 4, 5)])
    callback = SampleAnswersCallback([], tokenizer, max_new_tokens=4)
    args = type("Args", (), {"output_dir": str(tmp_path)})()
    callback.on_train_begin(args, TrainerState(global_step=4), None)  # resumed from checkpoint-4
    assert [item.step for item in callback.records] == [2, 4]  # step 5 is trained and answered again
    callback.on_train_begin(args, TrainerState(global_step=0), None)  # a new run in the same directory
    assert callback.records == []
    assert [item.step for item in read_sample_answers(tmp_path / "sample_answers.jsonl")] == [2, 4, 5]


# -------------------------------------------------------------------------------------- during training


def answers_by_step(records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    steps: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        steps.setdefault(record["step"], []).append(record)
    return steps


def assert_answers_of(
    model: Any, tokenizer: Any, records: list[dict[str, Any]], prompts: list[SamplePrompt]
) -> None:
    """`records` (one evaluation, in prompt order) are what `model` answers to `prompts` one at a time."""
    assert [record["index"] for record in records] == list(range(len(prompts)))
    assert [record["id"] for record in records] == [prompt.id for prompt in prompts]
    assert [record["answer"] for record in records] == alone_answers(model, tokenizer, prompts)


def lora_argv(
    checkpoint: Path, data_file: Path, output: Path, workdir: Path, sample_flags: list[str]
) -> list[str]:
    """LoRA, 4 steps, evaluated before training and every 2 steps, checkpoints at 2 and 4."""
    return reporting.flags(
        checkpoint,
        data_file,
        output,
        workdir / "cache",
        steps=4,
        eval_steps=2,
        extra=[
            "--learning_rate",
            "1e-3",  # small enough that a random model keeps talking, large enough to change its answers
            "--eval_on_start",
            "True",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            *sample_flags,
        ],
    )


@pytest.fixture(scope="module")
def trained(
    tiny_chat_checkpoint, data_file, workdir, tokenizer, eval_set
) -> tuple[Path, str, list[SamplePrompt]]:
    """The LoRA run answering 3 questions and the first 2 eval samples, with TensorBoard."""
    output = workdir / "lora"
    questions = reporting.write_questions(workdir / "questions.txt")
    sample_flags = [
        "--report_to",
        "tensorboard",
        "--logging_dir",
        str(output / "tb"),
        "--sample_prompts",
        str(questions),
        "--eval_samples",
        "2",
        "--sample_max_new_tokens",
        str(MAX_NEW_TOKENS),
    ]
    argv = lora_argv(tiny_chat_checkpoint, data_file, output, workdir, sample_flags)
    log = helpers.run([helpers.PYTHON, str(helpers.FINETUNE_PY), *argv], env=helpers.subprocess_env())
    prompts = [
        *prompts_of(tokenizer, sample_prompts=str(questions)),
        *prompts_of(tokenizer, eval_samples=2, eval_set=eval_set),
    ]
    return output, log, prompts


@pytest.mark.slow
def test_answering_does_not_change_training(trained, tiny_chat_checkpoint, data_file, workdir):
    output = workdir / "lora-without-answers"
    argv = lora_argv(tiny_chat_checkpoint, data_file, output, workdir, [])
    helpers.run([helpers.PYTHON, str(helpers.FINETUNE_PY), *argv], env=helpers.subprocess_env())
    assert not (output / "sample_answers.jsonl").exists()
    for key in ("loss", "grad_norm", "eval_loss"):
        with_answers = [entry[key] for entry in helpers.log_history(trained[0]) if key in entry]
        assert with_answers == [entry[key] for entry in helpers.log_history(output) if key in entry], key


@pytest.mark.slow
def test_each_evaluation_answers_every_prompt_once_with_the_model_of_its_step(
    trained, tiny_chat_checkpoint, tokenizer
):
    output, log, prompts = trained
    steps = answers_by_step(reporting.sample_records(output))
    assert sorted(steps) == [0, 2, 4]
    assert_answers_of(helpers.load_artifact(tiny_chat_checkpoint), tokenizer, steps[0], prompts)
    for step in (2, 4):
        assert_answers_of(
            helpers.load_artifact(output / f"checkpoint-{step}"), tokenizer, steps[step], prompts
        )
    assert [record["answer"] for record in steps[0]] != [record["answer"] for record in steps[4]]
    assert {record["reference"] for record in steps[4][3:]} == {"Blue.", "Four."}
    for records in steps.values():
        for record in records:
            assert record["stopped"] or record["new_tokens"] == MAX_NEW_TOKENS
            line = f"step {record['step']}/4 | sample {record['id']} | {record['question']} -> "
            assert log.count(line) == 1, line


@pytest.mark.slow
def test_tensorboard_has_the_toolkit_values_and_the_answers(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    output, _, prompts = trained
    events = EventAccumulator(str(output / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    history = helpers.log_history(output)
    for key, tag in [
        ("tokens_seen", "train/tokens_seen"),
        ("supervised_tokens_seen", "train/supervised_tokens_seen"),
        ("tokens_per_second", "train/tokens_per_second"),
        ("peak_memory_bytes", "train/peak_memory_bytes"),
        ("eval_loss", "eval/loss"),
        ("eval_perplexity", "eval/perplexity"),
    ]:
        logged = [(entry["step"], entry[key]) for entry in history if key in entry]
        written = [(event.step, event.value) for event in events.Scalars(tag)]
        assert len(logged) == len(written) > 0, key
        assert [step for step, _ in written] == [step for step, _ in logged], key
        assert [value for _, value in written] == pytest.approx([value for _, value in logged], rel=1e-6), key
    records = reporting.sample_records(output)
    tags = [tag for tag in events.Tags()["tensors"] if tag.startswith("sample_answers/")]
    assert len(tags) == len(prompts)
    for record in records:
        tag = next(tag for tag in tags if tag.startswith(f"sample_answers/{record['index']:02d}_"))
        texts = {
            event.step: tensor_util.make_ndarray(event.tensor_proto).item().decode("utf-8")
            for event in events.Tensors(tag)
        }
        assert sorted(texts) == [0, 2, 4]
        shown = texts[record["step"]]
        assert f"{record['new_tokens']} tokens" in shown
        for text in (record["question"], record["answer"]):
            assert all(line.strip() in shown for line in text.splitlines())


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_on_two_processes_writes_each_answer_once(tiny_chat_checkpoint, data_file, workdir, tokenizer):
    output = workdir / "zero3"
    questions = reporting.write_questions(workdir / "questions.txt")
    argv = reporting.flags(
        tiny_chat_checkpoint,
        data_file,
        output,
        workdir / "cache",
        steps=2,
        eval_steps=2,
        method="full",
        processes=2,
        extra=[
            "--learning_rate",
            "2e-4",
            "--eval_on_start",
            "True",
            "--deepspeed",
            str(helpers.DS_ZERO3),
            "--sample_prompts",
            str(questions),
            "--sample_max_new_tokens",
            str(MAX_NEW_TOKENS),
        ],
    )
    helpers.run(
        helpers.torchrun(2, helpers.FINETUNE_PY, argv, port=helpers.free_port()), env=helpers.subprocess_env()
    )
    steps = answers_by_step(reporting.sample_records(output))
    assert sorted(steps) == [0, 2]
    prompts = prompts_of(tokenizer, sample_prompts=str(questions))
    assert_answers_of(helpers.load_artifact(tiny_chat_checkpoint), tokenizer, steps[0], prompts)
    assert_answers_of(helpers.load_artifact(output), tokenizer, steps[2], prompts)  # the final weights
    assert [record["answer"] for record in steps[0]] != [record["answer"] for record in steps[2]]
