"""The one exception bad training data raises: it says what is wrong, where, and how to fix it."""

from __future__ import annotations

from pathlib import Path

from qwen_finetune.errors import ToolkitError


class DataError(ToolkitError):
    """Bad input data. The message names the file, the sample (index and id), the field, the problem
    and the fix, so a user can correct the file without reading our code. The parts are kept as
    attributes too, for tests and for callers that want to format differently."""

    def __init__(
        self,
        problem: str,
        *,
        fix: str,
        file: str | Path | None = None,
        index: int | None = None,
        sample_id: str | None = None,
        field: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        self.problem = problem
        self.fix = fix
        self.file = None if file is None else str(file)
        self.index = index
        self.sample_id = sample_id
        self.field = field
        self.line = line
        self.column = column
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.line is not None:
            where.append(f"line {self.line}" + (f", column {self.column}" if self.column is not None else ""))
        if self.index is not None:
            sample = f"sample {self.index}"
            if self.sample_id is not None:
                sample += f" (id {self.sample_id!r})"
            where.append(sample)
        if self.field is not None:
            where.append(f"field {self.field!r}")
        location = ": ".join(where)
        prefix = f"{location}: " if location else ""
        return f"{prefix}{self.problem}. Fix: {self.fix}"
