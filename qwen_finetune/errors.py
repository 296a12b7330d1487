"""The one base of every error the toolkit reports to its users.

Entry points catch `ToolkitError` alone and print its message: it says what is wrong, where and how
to fix it. Anything else is a bug and keeps its traceback.
"""


class ToolkitError(Exception):
    """A problem with the user's input (flags, files, data), explained in the message."""


class ArgumentError(ToolkitError):
    """A flag, or a combination of flags, that cannot work; the message says how to fix it."""


class OutputDirError(ToolkitError):
    """The output directory cannot be used as asked (not empty, not writable, overlaps an input)."""


class InputFileError(ToolkitError):
    """An input file (a checkpoint's config, an adapter's settings) is missing, unreadable or malformed."""
