"""Where jobs may read and write: anywhere, unless an operator set an allow-list.

On a user's own machine or allocation a job reads stacks wherever the particle
files say (absolute paths, ``../``, links) and writes where it is told. A
shared cluster service (one scheduler running many users' jobs) may limit the
folders its jobs touch: the operator sets ``HETERO_DASK_ALLOWED_PATHS`` (folders
separated by ``:``) in the environment of the process that runs the jobs, or
``hetero_dask.allowed-paths`` (a list of folders) in its Dask configuration.
Every input (particle file, stack, map, mask) and the output folder must then
lie inside one of them. Paths are compared after links are resolved, so a link
inside an allowed folder cannot lead out of it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError

ENV = "HETERO_DASK_ALLOWED_PATHS"
CONFIG_KEY = "hetero_dask.allowed-paths"


def allowed_roots() -> list[Path] | None:
    """The operator's allowed folders (links resolved), or None when no allow-list is set."""
    text = os.environ.get(ENV)
    if text is not None:
        roots = [r for r in text.split(os.pathsep) if r.strip()]
    else:
        import dask

        roots = dask.config.get(CONFIG_KEY, None)
        if roots is None:
            return None
        roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
    return [Path(os.path.realpath(os.path.expanduser(str(r)))) for r in roots]


def check_allowed(path, what: str, *, source=None, field: str | None = None) -> Path:
    """Return ``path``; raise :class:`InputError` when an allow-list is set and ``path`` is outside it.

    ``what`` names the path for the message (e.g. ``"--out"``, ``"stack"``);
    ``source``/``field``: the file and field it came from, if any.
    """
    roots = allowed_roots()
    if roots is None:
        return Path(path)
    real = os.path.realpath(path)
    if any(os.path.commonpath([real, str(r)]) == str(r) for r in roots):
        return Path(path)
    shown = f"{path}" + ("" if real == os.path.abspath(path) else f" (a link to {real})")
    raise InputError(
        source if source is not None else path,
        f"{what} {shown} is outside the folders this installation allows",
        field=field,
        expected=f"a path inside {', '.join(map(str, roots))} (set by the operator in ${ENV} "
        f"or the Dask configuration key {CONFIG_KEY})",
    )
