"""Flag values that are needed before the parser exists, i.e. before torch and transformers are imported:
--verbose decides what those imports may print, the Q-LoRA flags which packages they may import."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def last_flag_values(argv: Sequence[str], names: Iterable[str]) -> dict[str, str | bool]:
    """name -> the value the last --NAME on the command line gives it (dashes or underscores in NAME):
    the text after '=', else the next argument unless that is a flag, else True (a bare boolean flag).
    Names that are not on the command line are left out."""
    wanted = set(names)
    values: dict[str, str | bool] = {}
    for index, item in enumerate(argv):
        if not item.startswith("--"):
            continue
        name, separator, value = item[2:].partition("=")
        name = name.replace("-", "_")
        if name not in wanted:
            continue
        if separator:
            values[name] = value
        elif index + 1 < len(argv) and not argv[index + 1].startswith("-"):
            values[name] = argv[index + 1]
        else:
            values[name] = True
    return values
