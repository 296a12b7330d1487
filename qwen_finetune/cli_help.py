"""finetune.py --help in a fraction of a second: without importing torch or transformers.

`render_help` writes the help from the argument dataclasses: the toolkit's own flags first, grouped,
one line each, then the Trainer's. The rendered text is stored in `finetune_help_text.py` with the
transformers version it was rendered with; `print_finetune_help` prints that text when the same
transformers is installed and renders it live (seconds: it imports transformers) when not.
Regenerate after changing a flag: `python -m qwen_finetune.cli_help --write` (a test checks that the
stored text is current).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen_finetune.console import configure_console

HELP_FLAGS = ("-h", "--help")
STORED_HELP = Path(__file__).with_name("finetune_help_text.py")
TRAINER_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"
WIDTH = 130
NAME_COLUMN = 36
COMMAND_FLAGS = ("config", "plan", "verbose")  # fields of TrainingArguments that steer the command itself


def wants_help(argv: Sequence[str]) -> bool:
    return any(item in HELP_FLAGS for item in argv)


def print_finetune_help() -> int:
    print(finetune_help(), end="")
    return 0


def finetune_help() -> str:
    import qwen_finetune.finetune_help_text as stored

    if importlib.metadata.version("transformers") == stored.TRANSFORMERS_VERSION:
        return stored.HELP
    from qwen_finetune.args import build_parser

    return build_parser().format_help()


def render_help(parser: Any) -> str:
    """The help text of a `qwen_finetune.args.FlagParser`."""
    import transformers

    from qwen_finetune.args import TrainingArguments

    actions = {
        action.dest: action for action in parser._actions if f"--{action.dest}" in action.option_strings
    }
    own_training = set(TrainingArguments.__dict__.get("__annotations__", {}))
    groups: list[tuple[str, list[str]]] = [("command", list(COMMAND_FLAGS))]
    toolkit_training: list[str] = []
    trainer: list[str] = []
    for dataclass_type in parser.dataclass_types:
        names = [item.name for item in dataclasses.fields(dataclass_type) if item.name in actions]
        if dataclass_type is TrainingArguments:
            toolkit_training = [name for name in names if name in own_training and name not in COMMAND_FLAGS]
            trainer = [name for name in names if name not in own_training]
        else:
            default_title = dataclass_type.__name__.removesuffix("Arguments").lower()
            groups.append((getattr(dataclass_type, "_argument_group_name", default_title), names))
    groups.append(
        ("training: the toolkit's flags, and original flags that transformers 5 renamed", toolkit_training)
    )
    lines = [
        "usage: python finetune.py [--config FILE ...] [--FLAG VALUE ...]",
        "       bash finetune/finetune_*.sh -m MODEL -d DATA [--FLAG VALUE ...]   (each script's -h says more)",
        "",
        parser.description or "",
        "Flags override the --config files. A yes/no flag alone means true; `--FLAG false` turns it off.",
        "",
    ]
    for title, names in groups:
        lines.append(f"{title}:")
        if title == "command":
            lines.append(_line("-h, --help", "Show this help and exit."))
        lines += [_flag_line(actions[name]) for name in names]
        lines.append("")
    lines.append(
        f"Trainer (transformers {transformers.__version__} TrainingArguments; details: {TRAINER_DOCS}):"
    )
    lines += [_flag_line(actions[name]) for name in trainer]
    return "\n".join(lines) + "\n"


def _flag_line(action: argparse.Action) -> str:
    name = f"--{action.dest}"
    choices = [str(choice) for choice in action.choices] if action.choices is not None else []
    text = _first_sentence(action.help or "")
    if choices and len(",".join(choices)) <= 24:
        name += " {" + ",".join(choices) + "}"
    elif choices:
        name += " CHOICE"
        text += f" One of: {', '.join(choices)}."
    elif not (action.nargs == "?" and action.const is True):  # a yes/no flag needs no value
        metavar = "N" if action.type is int else "X" if action.type is float else "TEXT"
        name += f" {metavar} [{metavar} ...]" if action.nargs in ("+", "*") else f" {metavar}"
    default = _default_text(action.default)
    return _line(name, text, f" [{default}]" if default else "")


def _line(name: str, text: str, suffix: str = "") -> str:
    """One line: the flag, its description cut to the width, then `suffix` (the default) uncut."""
    head = f"  {name}".ljust(NAME_COLUMN - 1) + " "
    room = max(WIDTH - len(head) - len(suffix), 40)
    if len(text) > room:
        text = text[: room - 1].rstrip() + "…"
    return (head + text + suffix).rstrip()


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.search(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s+(?=[A-Z`(])", text)
    return text[: match.start()] if match else text


def _default_text(value: Any) -> str:
    if value is None or value is False or value in ("", []):
        return ""
    if value is True:
        return "true"
    if isinstance(value, list | tuple):
        return " ".join(str(item) for item in value)
    text = str(getattr(value, "value", value))  # an enum shows its value
    return text if len(text) <= 40 else text[:39] + "…"


def stored_module_text(help_text: str, transformers_version: str) -> str:
    """The source of finetune_help_text.py."""
    body = "\n".join(
        f"    {json.dumps(line + chr(10), ensure_ascii=False)}" for line in help_text.splitlines()
    )
    return (
        '"""finetune.py --help, rendered by `python -m qwen_finetune.cli_help --write`: do not edit."""\n\n'
        f"TRANSFORMERS_VERSION = {json.dumps(transformers_version)}\n"
        f"HELP = (\n{body}\n)\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render finetune.py --help and store it in the package.")
    parser.add_argument(
        "--write", action="store_true", help=f"write {STORED_HELP.name} (else print the text)"
    )
    args = parser.parse_args(argv)
    configure_console([])
    import transformers

    from qwen_finetune.args import build_parser

    text = build_parser().format_help()
    if not args.write:
        print(text, end="")
        return 0
    STORED_HELP.write_text(stored_module_text(text, transformers.__version__), encoding="utf-8")
    print(f"wrote {STORED_HELP} ({len(text.splitlines())} lines)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
