"""The ChatML conversation format of Qwen chat models: what every prompt, template and data encoder shares.

A flat module without imports, copied next to checkpoints with the model files.

`CHAT_TEMPLATE` is the Jinja chat template the tokenizer carries (`tokenizer.apply_chat_template`,
and every tool built on it: TRL, vLLM, transformers pipelines, llama.cpp). It renders the text the
toolkit's data pipeline trains on (docs/data_formats.md):

- a system turn first, the conversation's own (a leading `system` message) or DEFAULT_SYSTEM_PROMPT;
- `<|im_start|>{role}\\n{content}<|im_end|>\\n` per user and assistant message, content untouched;
- with tools (`tools=[...]`, assistant messages with `tool_calls`, `tool` messages) Qwen's ReAct
  text: the tool instruction before the first question, and one assistant turn per run of calls,
  tool results and answers (`Thought:` / `Action:` / `Action Input:` / `Observation:` /
  `Final Answer:`), message texts tidied as the pipeline tidies them;
- `{% generation %}` around what the `assistant_only` label policy trains on (assistant text and
  its `<|im_end|>`, never a tool result), so `return_assistant_tokens_mask=True` marks those tokens;
- `add_generation_prompt=True` opens an assistant turn, or, when the conversation ends with a tool
  call or a tool result, keeps that ReAct turn open for the model to continue.
"""

# The system turn used when a conversation brings none (as in the released chat models).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen's ReAct convention for tool use, as text pieces (the template joins them around the tool
# descriptions, names, calls and results).
REACT_TOOL_LINE = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. "
    "What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}"
)
REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tool_lines}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tool_names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""
REACT_QUESTION = "\n\nQuestion: "
REACT_THOUGHT = "Thought:"
REACT_ACTION = "\nAction: "
REACT_ACTION_INPUT = "\nAction Input: "
REACT_OBSERVATION_LABEL = "\nObservation:"
REACT_FINAL_ANSWER = "Thought: I now know the final answer.\nFinal Answer: "


def _literal(text: str) -> str:
    """`text` as a Jinja string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def _split_at(text: str, *placeholders: str) -> list[str]:
    """The literal pieces of `text` around each placeholder, in order (one more piece than placeholders)."""
    pieces = []
    for placeholder in placeholders:
        before, found, text = text.partition(placeholder)
        if not found:
            raise ValueError(f"{placeholder} not found in the ReAct text")
        pieces.append(before)
    return [*pieces, text]


def _build_chat_template() -> str:
    line = [
        _literal(piece)
        for piece in _split_at(
            REACT_TOOL_LINE,
            "{name_for_model}",
            "{name_for_human}",
            "{name_for_human}",
            "{description_for_model}",
            "{parameters}",
        )
    ]
    instruction = [_literal(piece) for piece in _split_at(REACT_INSTRUCTION, "{tool_lines}", "{tool_names}")]
    # Every tag trims the whitespace around it, so only `{{ ... }}` expressions produce text.
    return f"""
{{#- Qwen ChatML, with Qwen's ReAct text for tools. See qwen_model/chat_format.py. -#}}
{{%- macro tidy(text) -%}}{{{{ text.lstrip('\\n').rstrip() }}}}{{%- endmacro -%}}
{{%- macro text_of(message) -%}}
    {{%- if message.content is string -%}}{{{{ message.content }}}}
    {{%- elif message.content is not defined and message.tool_calls -%}}
    {{%- else -%}}{{{{ raise_exception('a ' + message.role + ' message needs a string content') }}}}
    {{%- endif -%}}
{{%- endmacro -%}}
{{%- if messages and messages[0].role == 'system' -%}}
    {{%- set system = text_of(messages[0]) -%}}
    {{%- set body = messages[1:] -%}}
{{%- else -%}}
    {{%- set system = {_literal(DEFAULT_SYSTEM_PROMPT)} -%}}
    {{%- set body = messages -%}}
{{%- endif -%}}
{{{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}}}
{{%- set state = namespace(react=tools is not none and tools | length > 0, open=false, parts=0,
    previous='user', tool_lines=[], tool_names=[]) -%}}
{{%- for message in body -%}}
    {{%- if message.role == 'tool' or message.tool_calls -%}}{{%- set state.react = true -%}}{{%- endif -%}}
{{%- endfor -%}}
{{%- if tools -%}}
    {{%- for tool in tools -%}}
        {{%- set function = tool.function if tool.function is mapping else tool -%}}
        {{%- set name = function.name_for_model or function.name -%}}
        {{%- set state.tool_names = state.tool_names + [name] -%}}
        {{%- set state.tool_lines = state.tool_lines + [{line[0]} + name + {line[1]}
            + (function.name_for_human or name) + {line[2]} + (function.name_for_human or name) + {line[3]}
            + (function.description_for_model or function.description or '') + {line[4]}
            + (function.get('parameters', {{}}) | tojson) + {line[5]}] -%}}
    {{%- endfor -%}}
{{%- endif -%}}
{{%- for message in body -%}}
    {{%- if message.role == 'system' -%}}
        {{{{- raise_exception('a system message is only allowed as the first message') -}}}}
    {{%- elif not state.react and message.role in ('user', 'assistant') -%}}
        {{%- if message.role == 'user' -%}}
            {{{{- '<|im_start|>user\\n' + text_of(message) + '<|im_end|>\\n' -}}}}
        {{%- else -%}}
            {{{{- '<|im_start|>assistant\\n' -}}}}
            {{%- generation -%}}{{{{- text_of(message) + '<|im_end|>' -}}}}{{%- endgeneration -%}}
            {{{{- '\\n' -}}}}
        {{%- endif -%}}
    {{%- elif message.role == 'user' -%}}
        {{%- if state.open -%}}
            {{%- generation -%}}{{{{- '<|im_end|>' -}}}}{{%- endgeneration -%}}
            {{{{- '\\n' -}}}}
            {{%- set state.open = false -%}}
        {{%- endif -%}}
        {{%- if tools and state.tool_lines -%}}
            {{{{- '<|im_start|>user\\n' + {instruction[0]} + state.tool_lines | join('\\n\\n') + {instruction[1]}
                + state.tool_names | join(', ') + {instruction[2]} + {_literal(REACT_QUESTION)}
                + tidy(text_of(message)) + '<|im_end|>\\n' -}}}}
            {{%- set state.tool_lines = [] -%}}
        {{%- else -%}}
            {{{{- '<|im_start|>user\\n' + tidy(text_of(message)) + '<|im_end|>\\n' -}}}}
        {{%- endif -%}}
        {{%- set state.previous = 'user' -%}}
    {{%- elif message.role in ('assistant', 'tool') -%}}
        {{%- if not state.open -%}}
            {{{{- '<|im_start|>assistant\\n' -}}}}
            {{%- set state.open = true -%}}
            {{%- set state.parts = 0 -%}}
        {{%- endif -%}}
        {{%- if message.role == 'tool' -%}}
            {{%- if state.previous not in ('call', 'tool') -%}}
                {{{{- raise_exception('a tool message must follow an assistant message with tool_calls') -}}}}
            {{%- endif -%}}
            {{%- generation -%}}{{{{- {_literal(REACT_OBSERVATION_LABEL)} -}}}}{{%- endgeneration -%}}
            {{{{- ' ' + tidy(text_of(message)) -}}}}
            {{%- set state.parts = state.parts + 1 -%}}
            {{%- set state.previous = 'tool' -%}}
        {{%- elif message.tool_calls -%}}
            {{%- for call in message.tool_calls -%}}
                {{%- set function = call.function if call.function is mapping else call -%}}
                {{%- set thought = tidy(text_of(message)) if loop.first else '' -%}}
                {{%- if not thought.startswith({_literal(REACT_THOUGHT)}) -%}}
                    {{%- set thought = {_literal(REACT_THOUGHT + " ")} + thought -%}}
                {{%- endif -%}}
                {{%- set arguments = function.arguments if function.arguments is string
                    else function.arguments | tojson -%}}
                {{%- generation -%}}
                    {{{{- ('\\n' if state.parts else '') + thought + {_literal(REACT_ACTION)} + function.name
                        + {_literal(REACT_ACTION_INPUT)} + arguments -}}}}
                {{%- endgeneration -%}}
                {{%- set state.parts = state.parts + 1 -%}}
            {{%- endfor -%}}
            {{%- set state.previous = 'call' -%}}
        {{%- else -%}}
            {{%- generation -%}}
                {{{{- ('\\n' if state.parts else '') + {_literal(REACT_FINAL_ANSWER)} + tidy(text_of(message)) -}}}}
            {{%- endgeneration -%}}
            {{%- set state.parts = state.parts + 1 -%}}
            {{%- set state.previous = 'assistant' -%}}
        {{%- endif -%}}
    {{%- else -%}}
        {{{{- raise_exception('unknown message role ' + message.role + ': use system, user, assistant or tool') -}}}}
    {{%- endif -%}}
{{%- endfor -%}}
{{%- if state.open and add_generation_prompt and state.previous in ('call', 'tool') -%}}
    {{{{- '\\n' -}}}}
{{%- else -%}}
    {{%- if state.open -%}}
        {{%- generation -%}}{{{{- '<|im_end|>' -}}}}{{%- endgeneration -%}}
        {{{{- '\\n' -}}}}
    {{%- endif -%}}
    {{%- if add_generation_prompt -%}}{{{{- '<|im_start|>assistant\\n' -}}}}{{%- endif -%}}
{{%- endif -%}}
""".strip()


CHAT_TEMPLATE = _build_chat_template()
