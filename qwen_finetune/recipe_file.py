"""`--config FILE`: flag values read from a YAML or JSON file (a recipe), checked against the parser.

A file's values become flags placed before those of the command line, so the command line overrides
them and every value goes through exactly the parsing, checks and old-name mapping of the flag it
stands for. A file may start from another one with `extends: OTHER_FILE` (relative to itself); its own
values win. Keys are flag names without the dashes; unknown keys and values of the wrong type are
errors that name the key and the file.
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qwen_finetune.errors import ArgumentError

CONFIG_FLAG = "--config"
EXTENDS_KEY = "extends"
# Flags that act before any file is read, so a file cannot set them.
COMMAND_LINE_ONLY = {"verbose": "--verbose (or QWEN_FINETUNE_VERBOSE=1)"}


def split_config_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the --config files in order, the other arguments). `--config A B`, `--config=A` and repeated
    flags all work; a file name never starts with '-'."""
    files: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(argv):
        item = argv[index]
        if item.startswith(CONFIG_FLAG + "="):
            files.append(item.split("=", 1)[1])
        elif item == CONFIG_FLAG:
            values = []
            while index + 1 < len(argv) and not argv[index + 1].startswith("-"):
                index += 1
                values.append(argv[index])
            if not values:
                raise ArgumentError(
                    f"{CONFIG_FLAG} needs a file, e.g. {CONFIG_FLAG} finetune/recipes/lora.yaml"
                )
            files.extend(values)
        else:
            rest.append(item)
        index += 1
    return files, rest


def config_arguments(files: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """The command-line arguments that the files' values stand for, later files after earlier ones."""
    actions = flag_actions(parser)
    arguments: list[str] = []
    for name in files:
        for key, (value, source) in read_config(Path(name)).items():
            arguments += _arguments_for(key, value, source, actions)
    return arguments


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Flag name (as in a config file) -> the parser action that reads it."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if f"--{action.dest}" in action.option_strings:
            actions[action.dest] = action
    actions.pop("help", None)
    actions.pop(CONFIG_FLAG.lstrip("-"), None)
    return actions


def read_config(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, tuple[Any, Path]]:
    """key -> (value, the file that set it), following `extends` (the extending file wins)."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(item) for item in (*seen, resolved))
        raise ArgumentError(f"{CONFIG_FLAG}: {EXTENDS_KEY} goes round in a circle: {chain}")
    values = _load_mapping(path)
    merged: dict[str, tuple[Any, Path]] = {}
    parent = values.pop(EXTENDS_KEY, None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ArgumentError(f"{path}: '{EXTENDS_KEY}' must be a file name, got {parent!r}")
        merged.update(read_config(path.parent / parent, (*seen, resolved)))
    for key, value in values.items():
        merged.pop(key, None)  # keep the extending file's order for its own keys
        merged[key] = (value, path)
    return merged


def _load_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArgumentError(f"{CONFIG_FLAG} {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            loaded = json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path))
        except json.JSONDecodeError as error:
            raise ArgumentError(
                f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
            ) from error
    else:
        loaded = _load_yaml(text, path)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ArgumentError(f"{path}: expected 'flag_name: value' lines, got a {type(loaded).__name__}")
    return loaded


def _unique_keys(pairs: list[tuple[str, Any]], path: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ArgumentError(f"{path}: '{key}' is set twice; keep one")
        result[key] = value
    return result


def _load_yaml(text: str, path: Path) -> Any:
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """PyYAML keeps the last of two equal keys silently; here that is an error."""

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
        keys = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if key in keys:
                line = key_node.start_mark.line + 1
                raise ArgumentError(f"{path}: '{key}' is set twice (again at line {line}); keep one")
            keys.add(key)
        return loader.construct_mapping(node)

    UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as error:
        raise ArgumentError(f"{path}: invalid YAML: {error}") from error


def _arguments_for(key: Any, value: Any, source: Path, actions: Mapping[str, argparse.Action]) -> list[str]:
    action = actions.get(key) if isinstance(key, str) else None
    if action is None:
        close = difflib.get_close_matches(str(key), list(actions), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else "; 'python finetune.py --help' lists every flag"
        raise ArgumentError(f"{source}: unknown key '{key}'{hint}")
    flag = f"--{key}"
    if key in COMMAND_LINE_ONLY:
        raise ArgumentError(
            f"{source}: {key} takes effect before config files are read; give {COMMAND_LINE_ONLY[key]} instead"
        )
    if value is None:
        raise ArgumentError(f"{source}: {key} has no value; give one, or remove the key to keep the default")
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ArgumentError(f"{source}: {key} is an empty list; give at least one value")
        texts = [_checked_text(key, item, source, action) for item in items]
        starting_with_dash = [text for text in texts if text.startswith("-")]
        if starting_with_dash:
            raise ArgumentError(
                f"{source}: {key}: list values cannot start with '-': {starting_with_dash[0]}"
            )
        return [flag, *texts]
    return [f"{flag}={_checked_text(key, value, source, action)}"]


def _checked_text(key: str, value: Any, source: Path, action: argparse.Action) -> str:
    """The value as command-line text, once it passed the checks its flag would apply."""
    is_bool_flag = action.nargs == "?" and action.const is True
    if is_bool_flag:
        if not isinstance(value, bool):
            raise ArgumentError(f"{source}: {key} must be true or false, got {value!r}")
        return str(value).lower()
    if isinstance(value, bool):
        raise ArgumentError(
            f"{source}: {key} must be a {_kind(action)}, got {str(value).lower()} (YAML reads unquoted "
            "yes/no/on/off as true/false: quote the word)"
        )
    if isinstance(value, list):
        raise ArgumentError(f"{source}: {key} takes one value, got a list")
    if isinstance(value, dict):
        text = json.dumps(value)
    else:
        if action.type is int and not isinstance(value, int):
            raise ArgumentError(f"{source}: {key} must be a whole number, got {value!r}")
        text = str(value)
    converter = action.type if callable(action.type) else str
    try:
        converted = converter(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
        raise ArgumentError(f"{source}: {key} must be a {_kind(action)}, got {value!r}") from error
    if action.choices is not None and converted not in action.choices:
        allowed = ", ".join(str(choice) for choice in action.choices)
        raise ArgumentError(f"{source}: {key} is {value!r}; choose one of {allowed}")
    return text


def _kind(action: argparse.Action) -> str:
    if action.choices is not None:
        return "one of " + ", ".join(str(choice) for choice in action.choices)
    if action.type is int:
        return "whole number"
    if action.type is float:
        return "number"
    return "text value"
