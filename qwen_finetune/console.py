"""What the toolkit's commands print: their own lines, progress bars and errors, and nothing else
unless asked (`--verbose`, or QWEN_FINETUNE_VERBOSE=1 in the environment).

Several libraries print while they are being imported (torchao's missing GPU kernels, bitsandbytes'
optional CPU kernel, gptqmodel's banner, DeepSpeed's accelerator guess), so `run_command` sets the
console up before a command's module, and with it torch or transformers, is imported.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

from qwen_finetune.early_flags import last_flag_values

VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "QWEN_FINETUNE_VERBOSE"
VERBOSE_HELP = f"Show third-party output too (library warnings, banners); also {VERBOSE_ENV}=1."
_FALSE_WORDS = ("0", "false", "no", "off")

# Read by the libraries when they start, here and in the processes this one starts (torchrun workers).
QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "GPTQMODEL_DISABLE_GIL_WARNING": "1",
}

# Loggers whose warnings report on optional kernels, deprecations inside the libraries and guesses
# the toolkit has already made for the user. Errors still show.
QUIET_LOGGERS = (
    "torchao",
    "torch.utils._pytree",  # torchao registering enums with torch.compile
    "bitsandbytes",
    "DeepSpeed",
    "accelerate",
    "peft",
    "optimum",
    "datasets",
    "transformers",
    "huggingface_hub",
    "matplotlib",
    "tokenicer",  # gptqmodel's tokenizer checks ("Auto fixed pad_token_id")
)
# gptqmodel logs through LogBar, which sets its own level when created and bypasses logging filters.
SILENCED_LOGGERS = ("logbar",)

# The toolkit's own warnings (and those attributed to its calls) always show.
_OWN_MODULES = r"(qwen_finetune|qwen_model)(\.|$)"


def verbose_requested(argv: Sequence[str]) -> bool:
    """--verbose [BOOL] on the command line (the last one wins), else the environment variable."""
    name = VERBOSE_FLAG.removeprefix("--")
    value = last_flag_values(argv, [name]).get(name)
    if value is None:
        return is_verbose()
    return str(value).lower() not in _FALSE_WORDS  # a bare --verbose reads 'true'


def is_verbose() -> bool:
    """Whether this command shows third-party output (valid once `configure_console` ran)."""
    return os.environ.get(VERBOSE_ENV, "").lower() not in (*_FALSE_WORDS, "")


def configure_console(argv: Sequence[str]) -> bool:
    """Quiet third-party output unless verbose was asked for; returns whether it was."""
    verbose = verbose_requested(argv)
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"  # inherited by the processes this one starts
    if not verbose:
        quiet_third_party()
    return verbose


def quiet_third_party() -> None:
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=_OWN_MODULES)  # checked first: inserted in front
    only_errors = _ErrorsOnly()
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        logger.addFilter(only_errors)  # survives libraries that reset their logger's level (DeepSpeed)
    for name in SILENCED_LOGGERS:
        logging.getLogger(name).disabled = True
    # LogBar (gptqmodel's logger) prints an empty line when it is first imported: where gptqmodel may be
    # imported (installed, and not hidden by unused_backends), import LogBar now, with stdout dropped.
    if importlib.util.find_spec("gptqmodel") is not None and importlib.util.find_spec("logbar") is not None:
        with quiet_prints():
            importlib.import_module("logbar")


@contextlib.contextmanager
def quiet_prints() -> Iterator[None]:
    """Drop what is print()ed to stdout inside the block, unless verbose: for libraries that print
    instead of logging (DeepSpeed's "... built successfully" when its CPU communication starts)."""
    if is_verbose():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def run_command(module: str, argv: Sequence[str] | None = None) -> int:
    """Configure the console, then import `module` and return its `main(argv)`: the thin entry points."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    configure_console(arguments)
    command = importlib.import_module(module)
    return int(command.main(arguments))


def log_to_stderr(prefix: str) -> None:
    """Show this package's INFO messages on stderr, prefixed, without changing other libraries' logging."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{prefix}] %(message)s"))
    package_logger = logging.getLogger("qwen_finetune")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
