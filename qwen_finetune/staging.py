"""Output directories written all or nothing, never over the user's inputs.

Every command that produces a directory builds it in a hidden staging directory next to the target
and renames it into place at the end, so an interrupted or failed run leaves either the old
directory or the complete new one, never half of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from qwen_finetune.errors import OutputDirError


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(
    out_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()
) -> Path:
    """Validate `out_dir` before any expensive work; returns it as an absolute path.

    Refused: a file in its place, a non-empty directory without `overwrite`, a location we
    cannot write, and a directory that is (or contains) one of `inputs`, which replacing it
    would destroy.
    """
    target = Path(out_dir).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"output path {target} exists and is not a directory; choose a directory path")
    for source in inputs:
        source_path = Path(source).expanduser().resolve()
        if source_path == target or target in source_path.parents:
            raise OutputDirError(
                f"output directory {target} would replace the input {source_path}; choose another output directory"
            )
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputDirError(
            f"output directory {target} is not empty; pass --overwrite to replace it, or choose another directory"
        )
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise OutputDirError(f"cannot create the output directory {target}: {parent} is not a directory")
    try:  # a real attempt: permission bits say nothing for root or on read-only file systems
        tempfile.TemporaryDirectory(prefix=f".{target.name}.probe-", dir=parent).cleanup()
    except OSError as error:
        raise OutputDirError(
            f"cannot write the output directory {target}: {parent} is not writable ({error})"
        ) from None
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_output_dir(
    out_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield an empty staging directory beside `out_dir`; on success it becomes `out_dir`.

    On any error the staging directory is removed and an existing `out_dir` is left untouched.
    """
    target = check_output_dir(out_dir, overwrite, inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as error:
        raise OutputDirError(f"cannot create the output directory {target}: {error}") from None
    try:
        yield staging
        staging.chmod(0o777 & ~_umask())
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(staging: Path, target: Path) -> None:
    """Move `staging` to `target`; an old `target` is moved aside first and deleted last."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / target.name)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
