"""Writing a file whole or not at all."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def write_atomic(path: str, write: Callable[[str], object]) -> None:
    """``write(tmp_path)`` into a temporary file beside ``path``, then rename it over ``path``: a reader (or a
    rerun that looks for ``path``) never sees half a file, and an error leaves nothing behind."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".sam-fast-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
