"""Writing a file whole or not at all."""

from __future__ import annotations

import json
import os
import uuid
from typing import Callable


def write_atomic(path: str, write: Callable[[str], object]) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then rename it over ``path``: a reader (or a
    rerun that looks for ``path``) never sees half a file, and an error leaves nothing behind.

    The temporary file is created as ``open()`` creates files (mode 0o666 less the process umask), so the result
    has the permissions any other file written there would have (``tempfile.mkstemp`` makes 0o600 files, which
    another user, or a later job in a shared folder, cannot read)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".sam-fast-{os.getpid()}-{uuid.uuid4().hex}{os.path.splitext(path)[1]}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, value, **dump_kwargs) -> None:
    """``json.dump(value)`` to ``path`` through :func:`write_atomic` (``dump_kwargs``: ``indent``, ``default``...)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(value, f, **dump_kwargs)

    write_atomic(path, write)
