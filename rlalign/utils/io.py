"""Atomic file writes: a crash or a kill never leaves a half-written file under the final name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = True) -> Path:
    """Run `write(tmp)` on a temporary file beside `path`, fsync it, then rename it over `path`.

    The temporary name keeps the suffix (writers such as `np.savez` key on it) and carries the pid, so
    two processes writing the same file never share a temporary. On any error the temporary is removed
    and `path` keeps what it held before.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
