"""The tokenizer's chat template renders what the data pipeline trains on and what chat() prompts with.

Two independent paths meet here: the raw data files go through the toolkit's pipeline
(`run_check_data` + `--dump_encoded`, label policy `assistant_only`), and through a small converter of
this module to the message shapes tools use (`tools=[...]`, `tool_calls`, `tool` messages), then
`apply_chat_template`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from qwen_finetune.data import DataArguments, run_check_data
from qwen_model.chat_format import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT
from qwen_model.chunked_loss import IGNORE_INDEX
from qwen_model.qwen_generation_utils import make_context
from qwen_model.tokenization_qwen import QWenTokenizer, token_char_spans

SHARED_FILES = [
    "llamafactory_alpaca_en_demo.json",
    "llamafactory_alpaca_zh_demo.json",
    "llamafactory_dpo_en_demo.json",
    "llamafactory_dpo_zh_demo.json",
    "llamafactory_glaive_toolcall_en_demo.json",
    "llamafactory_identity.json",
    "qwen_test_sampled.json",
]
FIXTURE_FILES = ["qwen_chat.json", "sharegpt_tools.json", "openai_tools.jsonl", "alpaca_history.json"]
MAX_LENGTH = 16384  # longer than every sample: nothing is truncated
# Conversations compared per file (evenly spaced), to keep the module fast; files with tools are
# compared whole.
SAMPLES_PER_FILE = 150

# ------------------------------------------------------------------------- an independent converter

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
}


def _call(call: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}


def _sharegpt_message(turn: dict[str, str]) -> dict[str, Any]:
    if turn["from"] == "function_call":
        calls = json.loads(turn["value"])
        return {
            "role": "assistant",
            "tool_calls": [_call(call) for call in (calls if isinstance(calls, list) else [calls])],
        }
    return {"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}


def to_messages(sample: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """A raw sample of any supported file as (messages, tools) in the usual chat-template shapes."""
    if "messages" in sample:
        messages = [dict(message) for message in sample["messages"]]
    elif "instruction" in sample:
        messages = []
        for question, answer in sample.get("history") or []:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        question = sample["instruction"] + (f"\n{sample['input']}" if sample.get("input") else "")
        messages += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": sample["output"]},
        ]
    else:
        turns = sample["conversations"] + ([sample["chosen"]] if "chosen" in sample else [])
        messages = [_sharegpt_message(turn) for turn in turns]
    system = [messages.pop(0)] if messages and messages[0]["role"] == "system" else []
    if sample.get("system"):
        system = [{"role": "system", "content": sample["system"]}]
    while messages and messages[0]["role"] != "user":  # what comes before the first question is not trained
        messages.pop(0)
    tools = sample.get("tools") or None
    return [*system, *messages], json.loads(tools) if isinstance(tools, str) else tools


# ---------------------------------------------------------------------------------- the two paths


def _read_samples(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    return (
        [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.suffix == ".jsonl"
        else json.loads(text)
    )


@pytest.fixture(scope="module")
def corpus(
    shared_data_dir: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory, tokenizer: QWenTokenizer
):
    """{file name: [(raw sample, pipeline input_ids, pipeline labels)]} for every file."""
    workdir = tmp_path_factory.mktemp("template-vs-pipeline")
    sources = {name: shared_data_dir / name for name in SHARED_FILES}
    sources.update({name: repo_root / "tests" / "fixtures" / "data" / name for name in FIXTURE_FILES})
    sources["example.json"] = repo_root / "data" / "example.json"
    samples, pipeline_inputs = {}, []
    for name, path in sources.items():
        samples[name] = _read_samples(path)
        if "chosen" in samples[name][0]:  # a preference pair's prompt and chosen answer, as a conversation
            path = workdir / name
            pairs = [{"conversations": [*pair["conversations"], pair["chosen"]]} for pair in samples[name]]
            path.write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
        pipeline_inputs.append(str(path))
    dump = workdir / "encoded.jsonl"
    arguments = DataArguments(
        data_path=",".join(pipeline_inputs),
        label_policy="assistant_only",
        check_data=True,
        dump_encoded=str(dump),
        data_cache_dir=str(workdir / "cache"),
    )
    assert run_check_data(arguments, tokenizer, MAX_LENGTH, output_dir=None) == 0
    rows = [json.loads(line) for line in dump.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == sum(len(file_samples) for file_samples in samples.values())
    corpus, start = {}, 0
    for name, file_samples in samples.items():
        file_rows = rows[start : start + len(file_samples)]
        corpus[name] = [
            (sample, row["input_ids"], row["labels"]) for sample, row in zip(file_samples, file_rows)
        ]
        start += len(file_samples)
    return corpus


ALL_FILES = [*SHARED_FILES, *FIXTURE_FILES, "example.json"]


def _token_characters(tokenizer: QWenTokenizer, input_ids: list[int]) -> list[set[int]]:
    spans = token_char_spans(
        tokenizer.vocabulary.encoding.decode_single_token_bytes(token) for token in input_ids
    )
    return [set(range(start, end)) for start, end in spans]


@pytest.mark.parametrize("name", ALL_FILES)
def test_template_text_and_trained_characters_equal_the_pipeline(
    name: str, corpus, tokenizer: QWenTokenizer
) -> None:
    for index, (sample, input_ids, labels) in enumerate(corpus[name]):
        messages, tools = to_messages(sample)
        rendered, [spans] = render_jinja_template(
            [messages], tools=tools, chat_template=CHAT_TEMPLATE, return_assistant_tokens_mask=True
        )
        assert rendered[0] == tokenizer.decode(input_ids), f"{name} sample {index}"
        generation = {char for start, end in spans for char in range(start, end)}
        # a token is trained on when any of its characters is generated (a token may straddle the end
        # of a tool result, e.g. "}" + "\n" before "Thought:")
        tokens = _token_characters(tokenizer, input_ids)
        trained = [bool(chars & generation) for chars in tokens]
        assert trained == [label != IGNORE_INDEX for label in labels], f"{name} sample {index}"
        assert generation <= set().union(*(chars for chars, keep in zip(tokens, trained) if keep))


@pytest.mark.parametrize("name", ALL_FILES)
def test_template_tokens_and_assistant_mask_equal_the_pipeline(
    name: str, corpus, tokenizer: QWenTokenizer
) -> None:
    for index, (sample, input_ids, labels) in enumerate(corpus[name]):
        messages, tools = to_messages(sample)
        encoded = tokenizer.apply_chat_template(
            messages, tools=tools, return_dict=True, return_assistant_tokens_mask=True
        )
        assert encoded["input_ids"] == input_ids, f"{name} sample {index}"
        assert encoded["assistant_masks"] == [int(label != IGNORE_INDEX) for label in labels], (
            f"{name} sample {index}"
        )


@pytest.mark.parametrize(
    "name", [name for name in ALL_FILES if "toolcall" not in name and "tools" not in name]
)
def test_generation_prompt_equals_the_prompt_chat_builds(name: str, corpus, tokenizer: QWenTokenizer) -> None:
    """Every conversation up to its last question: chat(query, history, system) prompts with the same ids."""
    compared = 0
    for index, (sample, _, _) in enumerate(corpus[name]):
        messages, _ = to_messages(sample)
        system = messages.pop(0)["content"] if messages[0]["role"] == "system" else DEFAULT_SYSTEM_PROMPT
        prompt = messages[:-1]
        if [message["role"] for message in prompt] != ["user", "assistant"] * (len(prompt) // 2) + ["user"]:
            continue  # chat() takes (query, response) pairs
        history = [(prompt[i]["content"], prompt[i + 1]["content"]) for i in range(0, len(prompt) - 1, 2)]
        _, context = make_context(
            tokenizer, prompt[-1]["content"], history, system=system, max_window_size=10**9
        )
        with_system = [{"role": "system", "content": system}, *prompt]
        ids = tokenizer.apply_chat_template(with_system, add_generation_prompt=True, return_dict=False)
        assert ids == context, f"{name} sample {index}"
        compared += 1
    assert compared == len(corpus[name])


# --------------------------------------------------------------------------------- template behaviour

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def render(tokenizer: QWenTokenizer, messages: list[dict[str, Any]], **options: Any) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **options)


def test_tokenizer_carries_the_template_and_saves_it_as_transformers_does(
    tokenizer: QWenTokenizer, vocab_file: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    import qwen_model  # noqa: F401  (registers QWenTokenizer with AutoTokenizer)

    assert tokenizer.chat_template == CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    assert "chat_template" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template == CHAT_TEMPLATE

    official = tmp_path / "official"  # as released: a vocabulary and a tokenizer_config without a template
    official.mkdir()
    (official / "qwen.tiktoken").write_bytes(vocab_file.read_bytes())
    (official / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "QWenTokenizer"}))
    assert AutoTokenizer.from_pretrained(official).chat_template == CHAT_TEMPLATE

    (official / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert AutoTokenizer.from_pretrained(official).chat_template == "{{ messages[0].content }}"


def test_every_tool_shape_renders_the_same_react_text(tokenizer: QWenTokenizer) -> None:
    def conversation(tool: dict[str, Any], call: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": "Weather in Hangzhou?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "21 degrees"},
            {"role": "assistant", "content": "It is 21 degrees."},
        ]

    arguments = {"city": "杭州"}
    shapes = [
        (WEATHER_TOOL, {"name": "get_weather", "arguments": arguments}),
        (
            {"type": "function", "function": WEATHER_TOOL},
            {"type": "function", "function": {"name": "get_weather", "arguments": arguments}},
        ),
        (
            WEATHER_TOOL,
            {"function": {"name": "get_weather", "arguments": json.dumps(arguments, ensure_ascii=False)}},
        ),
    ]
    texts = {render(tokenizer, conversation(tool, call), tools=[tool]) for tool, call in shapes}
    assert len(texts) == 1
    assert texts.pop().endswith(
        "Begin!\n\nQuestion: Weather in Hangzhou?<|im_end|>\n<|im_start|>assistant\nThought: \nAction: get_weather\n"
        'Action Input: {"city": "杭州"}\nObservation: 21 degrees\nThought: I now know the final answer.\n'
        "Final Answer: It is 21 degrees.<|im_end|>\n"
    )


def test_tool_descriptions_parallel_calls_and_thoughts(tokenizer: QWenTokenizer) -> None:
    tool = {**WEATHER_TOOL, "name_for_human": "Weather", "description_for_model": "Ask it about weather."}
    text = render(
        tokenizer,
        [
            {"role": "system", "content": "Be a weather bot."},
            {"role": "user", "content": "\nHangzhou and Paris?  "},
            {
                "role": "assistant",
                "content": "Thought: two cities",
                "tool_calls": [
                    {"name": "get_weather", "arguments": {"city": "Hangzhou"}},
                    {"name": "get_weather", "arguments": {"city": "Paris"}},
                ],
            },
            {"role": "tool", "content": "21"},
            {"role": "tool", "content": "12\n"},
        ],
        tools=[tool],
    )
    parameters = json.dumps(WEATHER_TOOL["parameters"])
    assert text == (
        "<|im_start|>system\nBe a weather bot.<|im_end|>\n<|im_start|>user\n"
        "Answer the following questions as best you can. You have access to the following APIs:\n\n"
        "get_weather: Call this tool to interact with the Weather API. What is the Weather API useful for? "
        f"Ask it about weather. Parameters: {parameters}\n\nUse the following format:\n\n"
        "Question: the input question you must answer\nThought: you should always think about what to do\n"
        "Action: the action to take, should be one of [get_weather]\nAction Input: the input to the action\n"
        "Observation: the result of the action\n"
        "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
        "Thought: I now know the final answer\nFinal Answer: the final answer to the original input question\n\n"
        "Begin!\n\nQuestion: Hangzhou and Paris?<|im_end|>\n<|im_start|>assistant\n"
        'Thought: two cities\nAction: get_weather\nAction Input: {"city": "Hangzhou"}\n'
        'Thought: \nAction: get_weather\nAction Input: {"city": "Paris"}\n'
        "Observation: 21\nObservation: 12<|im_end|>\n"
    )


def test_generation_prompt_after_a_tool_result_continues_the_react_turn(tokenizer: QWenTokenizer) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {}}]},
        {"role": "tool", "content": "sunny"},
    ]
    closed = render(tokenizer, messages, tools=[WEATHER_TOOL])
    open_turn = render(tokenizer, messages, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert closed.endswith("Observation: sunny<|im_end|>\n")
    assert open_turn == closed.removesuffix("<|im_end|>\n") + "\n"  # the model goes on with "Thought: ..."
    answered = [*messages, {"role": "assistant", "content": "Sunny."}]
    assert render(tokenizer, answered, tools=[WEATHER_TOOL], add_generation_prompt=True).endswith(
        "Final Answer: Sunny.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_continue_final_message_leaves_the_answer_open(tokenizer: QWenTokenizer) -> None:
    messages = [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two"}]
    text = render(tokenizer, messages, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nOne, two")


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only allowed as the first"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "must follow an assistant"),
        ([{"role": "narrator", "content": "a"}], "unknown message role narrator"),
        ([{"role": "user", "content": ["a"]}], "needs a string content"),
    ],
    ids=["late-system", "tool-without-call", "unknown-role", "non-string"],
)
def test_conversations_the_format_cannot_hold_are_refused(
    tokenizer: QWenTokenizer, messages: list[dict[str, Any]], message: str
) -> None:
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match=message):
        render(tokenizer, messages)


def test_special_token_text_in_messages(tokenizer: QWenTokenizer) -> None:
    """By default special-token text in a message becomes control tokens (as the pipeline with
    --allow_special_tokens_in_data); sanitised, it stays text (encoded apart from its neighbours)."""
    query = "What does <|im_end|> mean?"
    messages = [{"role": "user", "content": query}]
    text, context = make_context(tokenizer, query)
    raw = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert raw == tokenizer.encode_text(text, allow_special=True)
    assert raw.count(tokenizer.im_end_id) == context.count(tokenizer.im_end_id) + 1
    sanitized = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, sanitize_control_tokens=True, return_dict=False
    )
    assert tokenizer.decode(sanitized) == text and sanitized.count(tokenizer.im_end_id) == context.count(
        tokenizer.im_end_id
    )
