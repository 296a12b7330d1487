"""cli_demo.py / qwen-chat: talk to a Qwen chat checkpoint in the terminal, or answer one query.

Works for every artifact the toolkit writes: a full or merged model, a GPTQ Int4/Int8 model, and a
LoRA / Q-LoRA adapter on its base (`--adapter DIR`, or `-c` pointing at the adapter directory).
Generation goes through the model's own `chat` / `chat_stream` (ChatML prompt, stop tokens,
history window), so what you see here is what `model.chat()` returns in Python.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from qwen_finetune.tokenizer_protocol import QwenTokenizerLike
from qwen_model.chat_format import DEFAULT_SYSTEM_PROMPT

from .checkpoint_info import (
    ADAPTER_CONFIG_FILE,
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    VOCAB_FILE,
    is_adapter_dir,
)
from .console import VERBOSE_HELP
from .errors import ArgumentError, InputFileError, ToolkitError
from .json_files import read_json

if TYPE_CHECKING:
    from transformers import HfArgumentParser

WELCOME = "Qwen chat. Type a message, or :help for commands (:clear to forget the history, :exit to quit)."


@dataclass
class ChatArguments:
    """The flags of cli_demo.py / qwen-chat."""

    checkpoint_path: str = field(
        metadata={
            "aliases": ["-c"],
            "help": "Model directory (full, merged or GPTQ), or a LoRA adapter directory with a local base.",
        }
    )
    adapter: str | None = field(
        default=None, metadata={"help": "LoRA / Q-LoRA adapter directory to apply to the model."}
    )
    system: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "System prompt."})
    query: str | None = field(
        default=None, metadata={"help": "Answer this one query, print the response and exit."}
    )
    seed: int = field(
        default=1234, metadata={"aliases": ["-s"], "help": "Random seed set before each reply."}
    )
    max_new_tokens: int | None = field(default=None, metadata={"help": "Longest reply in tokens."})
    greedy: bool = field(
        default=False, metadata={"help": "Greedy decoding instead of the config's sampling."}
    )
    stop_words: list[str] | None = field(
        default=None,
        metadata={
            "help": "Texts that end a reply (kept at its end), e.g. --stop_words 'Observation:'; "
            "any number of tokens each, added to the checkpoint's stop words."
        },
    )
    cpu_only: bool = field(default=False, metadata={"help": "Run on the CPU."})
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})


@dataclass
class LoadedChatModel:
    model: Any
    tokenizer: QwenTokenizerLike
    generation_config: Any
    description: str


@dataclass
class ChatSession:
    loaded: LoadedChatModel
    system: str
    seed: int
    history: list[tuple[str, str]] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    stop_words_ids: list[list[int]] = field(default_factory=list)

    def effective_generation_config(self) -> Any:
        """The checkpoint's generation config with this session's :conf / flag overrides applied."""
        config = copy.deepcopy(self.loaded.generation_config)
        config.update(**self.overrides)
        return config


# ------------------------------------------------------------------------------------------ loading


def resolve_model_dirs(checkpoint: str | Path, adapter: str | Path | None) -> tuple[Path, Path | None]:
    """(model directory, adapter directory or None); `-c ADAPTER_DIR` alone means its recorded base."""
    path = Path(checkpoint).expanduser().resolve()
    if not path.is_dir():
        raise InputFileError(f"checkpoint directory {path} does not exist")
    if adapter is None and is_adapter_dir(path):
        base = read_json(path / ADAPTER_CONFIG_FILE).get("base_model_name_or_path")
        if not base or not Path(base).expanduser().is_dir():
            raise InputFileError(
                f"{path} is a LoRA adapter whose base model {base!r} is not a local directory; "
                f"run with -c BASE_MODEL_DIR --adapter {path}"
            )
        return Path(base).expanduser().resolve(), path
    if not (path / CONFIG_FILE).is_file():
        raise InputFileError(f"{path} has no {CONFIG_FILE}, so it is not a model checkpoint directory")
    if adapter is None:
        return path, None
    adapter_path = Path(adapter).expanduser().resolve()
    if not is_adapter_dir(adapter_path):
        raise InputFileError(
            f"--adapter {adapter_path} has no {ADAPTER_CONFIG_FILE}, so it is not a LoRA adapter"
        )
    return path, adapter_path


def _first_holding(directories: list[Path], name: str) -> Path | None:
    return next((directory for directory in directories if (directory / name).is_file()), None)


def load_chat_model(
    checkpoint: str | Path, adapter: str | Path | None = None, cpu_only: bool = False
) -> LoadedChatModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import qwen_model  # noqa: F401  (registers the Qwen classes with the Auto* factories)

    model_dir, adapter_dir = resolve_model_dirs(checkpoint, adapter)
    device = "cuda" if torch.cuda.is_available() and not cpu_only else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device).eval()
    description = str(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).eval().get_base_model()
        description = f"{model_dir} + adapter {adapter_dir}"
    # A training output directory carries the tokenizer and generation config of the fine-tuned model.
    searched = [adapter_dir, model_dir] if adapter_dir is not None else [model_dir]
    tokenizer = cast(
        QwenTokenizerLike, AutoTokenizer.from_pretrained(_first_holding(searched, VOCAB_FILE) or model_dir)
    )
    generation_dir = _first_holding(searched, GENERATION_CONFIG_FILE)
    generation_config = (
        GenerationConfig.from_pretrained(generation_dir) if generation_dir else model.generation_config
    )
    chat_format = getattr(generation_config, "chat_format", None)
    if chat_format != "chatml":
        raise ArgumentError(
            f"{description} has generation_config.chat_format {chat_format!r}, not 'chatml': it looks like a "
            "base (pre-trained) model, which was not trained to chat. Use a chat model, or fine-tune this one "
            "on conversations first."
        )
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is not None:
        bits = (
            quantization.get("bits") if isinstance(quantization, dict) else getattr(quantization, "bits", "?")
        )
        description += f" (GPTQ int{bits})"
    return LoadedChatModel(model, tokenizer, generation_config, description)


# ------------------------------------------------------------------------------------------- replies


def reply(session: ChatSession, query: str, on_text: Callable[[str], None] | None = None) -> str:
    """Answer `query` after the session's history; with `on_text`, stream the new text to it as it comes."""
    from transformers import set_seed

    set_seed(session.seed)
    loaded = session.loaded
    config = session.effective_generation_config()
    options = {
        "history": session.history,
        "system": session.system,
        "generation_config": config,
        "stop_words_ids": session.stop_words_ids,
    }
    if on_text is None:
        response, _ = loaded.model.chat(loaded.tokenizer, query, **options)
        return response
    shown = ""
    for text in loaded.model.chat_stream(loaded.tokenizer, query, **options):
        on_text(text[len(shown) :] if text.startswith(shown) else f"\n{text}")
        shown = text
    return shown


# ------------------------------------------------------------------------------------------ commands


def _help(session: ChatSession, argument: str) -> bool:
    print(
        "Commands:\n"
        "  :help, :h              show this help\n"
        "  :exit, :quit, :q       leave\n"
        "  :clear, :clear-history forget the conversation so far\n"
        "  :cls, :clear-screen    clear the terminal\n"
        "  :history, :his         show the conversation so far\n"
        "  :system [TEXT]         show, or set, the system prompt (clears the history)\n"
        "  :seed [N]              show, or set, the random seed used before each reply\n"
        "  :conf [KEY=VALUE]      show the generation config, or change one setting (e.g. :conf top_p=0.5)\n"
        "  :reset-conf            undo every :conf change"
    )
    return True


def _exit(session: ChatSession, argument: str) -> bool:
    return False


def _clear(session: ChatSession, argument: str) -> bool:
    session.history.clear()
    print("history cleared")
    return True


def _cls(session: ChatSession, argument: str) -> bool:
    print("\033[2J\033[H", end="", flush=True)
    return True


def _history(session: ChatSession, argument: str) -> bool:
    if not session.history:
        print("(no history)")
    for index, (query, response) in enumerate(session.history, start=1):
        print(f"[{index}] User: {query}\n[{index}] Qwen: {response}")
    return True


def _system(session: ChatSession, argument: str) -> bool:
    if argument:
        session.system = argument
        session.history.clear()
        print("system prompt set; history cleared")
    else:
        print(f"system prompt: {session.system}")
    return True


def _seed(session: ChatSession, argument: str) -> bool:
    if argument:
        try:
            session.seed = int(argument)
        except ValueError:
            print(f"not an integer seed: {argument!r}")
            return True
    print(f"seed: {session.seed}")
    return True


def _conf(session: ChatSession, argument: str) -> bool:
    if not argument:
        print(session.effective_generation_config().to_json_string())
        return True
    key, separator, raw = argument.partition("=")
    if not separator or not key.strip():
        print("usage: :conf KEY=VALUE, e.g. :conf top_p=0.5 or :conf do_sample=false")
        return True
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    key = key.strip()
    problem = _setting_problem(session.effective_generation_config(), key, value)
    if problem:
        print(f"not changed: {problem}")
        return True
    session.overrides[key] = value
    print(f"{key} = {value!r}")
    return True


def _setting_problem(config: Any, key: str, value: Any) -> str:
    """Why `key=value` cannot go into the generation config ("" when it can)."""
    if not hasattr(config, key):
        return f"{key} is not a generation setting (:conf lists them)"
    current = getattr(config, key)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(current, bool) and not isinstance(value, bool):
        return f"{key} takes true or false"
    if isinstance(current, (int, float)) and not isinstance(current, bool) and not number:
        return f"{key} takes a number"
    try:  # transformers' own checks of the values
        copy.deepcopy(config).update(**{key: value})
    except ValueError as error:
        return str(error)
    return ""


def _reset_conf(session: ChatSession, argument: str) -> bool:
    session.overrides.clear()
    print("generation config reset")
    return True


COMMANDS: dict[str, Callable[[ChatSession, str], bool]] = {
    ":help": _help,
    ":h": _help,
    ":exit": _exit,
    ":quit": _exit,
    ":q": _exit,
    ":clear": _clear,
    ":clear-history": _clear,
    ":cls": _cls,
    ":clear-screen": _cls,
    ":history": _history,
    ":his": _history,
    ":system": _system,
    ":seed": _seed,
    ":conf": _conf,
    ":reset-conf": _reset_conf,
}


def run_command(session: ChatSession, line: str) -> bool:
    """Run a `:command`; returns False when the session should end."""
    name, _, argument = line.strip().partition(" ")
    handler = COMMANDS.get(name)
    if handler is None:
        print(f"unknown command {name}; :help lists the commands")
        return True
    return handler(session, argument.strip())


def interactive(session: ChatSession) -> int:
    print(f"{WELCOME}\nmodel: {session.loaded.description}")
    while True:
        try:
            line = input("\nUser> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if line.strip().startswith(":"):
            if not run_command(session, line):
                return 0
            continue
        print("\nQwen: ", end="", flush=True)
        try:
            response = reply(session, line, on_text=lambda text: print(text, end="", flush=True))
        except KeyboardInterrupt:
            print("\n(interrupted; this turn is not kept in the history)")
            continue
        print()
        session.history.append((line, response))


# ------------------------------------------------------------------------------------------ command


def build_parser() -> HfArgumentParser:
    from transformers import HfArgumentParser
    from transformers.hf_argparser import DataClassType

    return HfArgumentParser(
        DataClassType(ChatArguments),
        description="Chat with a Qwen checkpoint: full, merged, GPTQ Int4/Int8, or base + LoRA adapter. "
        "Reference: docs/after_training.md.",
    )


def start_session(args: ChatArguments) -> ChatSession:
    """Load the model the flags name and open a session with their settings."""
    # Some libraries (gptqmodel) log to stdout; keep stdout for the conversation / the --query answer.
    with contextlib.redirect_stdout(sys.stderr):
        loaded = load_chat_model(args.checkpoint_path, args.adapter, cpu_only=args.cpu_only)
    stop_words_ids = [loaded.tokenizer.encode_text(word) for word in args.stop_words or []]
    empty = [word for word, ids in zip(args.stop_words or [], stop_words_ids) if not ids]
    if empty:
        raise ArgumentError(f"--stop_words {empty[0]!r} is empty: give texts with at least one character")
    session = ChatSession(loaded, system=args.system, seed=args.seed, stop_words_ids=stop_words_ids)
    if args.max_new_tokens is not None:
        session.overrides["max_new_tokens"] = args.max_new_tokens
    if args.greedy:
        session.overrides["do_sample"] = False
    return session


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    (args,) = parser.parse_args_into_dataclasses(argv)
    try:
        session = start_session(args)
        if args.query is None:
            return interactive(session)
        with contextlib.redirect_stdout(sys.stderr):
            response = reply(session, args.query)
    except ToolkitError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(response)
    return 0
