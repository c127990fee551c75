"""The one exception raised for bad input files, and atomic file output.

Every reader in :mod:`hetero_dask.io` raises :class:`InputError` (a
``ValueError``) with a message naming the file, the row or field, and what
was expected, so a user can fix the input without reading our code.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


class InputError(ValueError):
    """A file cannot be used as given: ``file: [row/field: ]problem (expected ...)``."""

    def __init__(self, file, problem: str, *, field: str | None = None, row=None, expected=None):
        self.file = str(file)
        self.field = field
        self.row = row
        self.expected = expected
        where = [self.file]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        msg = f"{': '.join(where)}: {problem}"
        if expected is not None:
            msg += f" (expected {expected})"
        super().__init__(msg)


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary file lives in the same directory (so ``os.replace`` is an
    atomic rename on POSIX). If the body raises, the temporary file is removed
    and any previous file at ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp makes the file private (0600); outputs should read like any other file.
    os.chmod(tmp, 0o644)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
