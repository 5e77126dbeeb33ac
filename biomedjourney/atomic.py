"""Atomic writes: the one way files and folders are written into place in this project.

``atomic_write(path, write)`` calls ``write(tmp)`` on a temporary file (or, with
``directory=True``, an empty temporary folder) next to ``path`` and then renames it onto
``path`` with ``os.replace``, so a reader never sees half a file and a crash never leaves one.
The temporary name starts with a dot (``.<name>.<random>.tmp``), so globs such as
``step-*`` or ``*.png`` never pick it up; it is removed when ``write`` raises. A file gets the
permissions of an ordinary new file (0o666 less the umask), not tempfile's private 0o600.

No dependencies beyond the standard library: configuration, manifests, checkpoints and
images all use it without pulling in one another's imports.
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], *, directory: bool = False) -> Path:
    """Call ``write(tmp_path)`` on a temp file (a temp folder with ``directory=True``) next to
    ``path``, then ``os.replace`` it into place; returns ``path`` as a Path.

    A folder replaces any existing folder at ``path`` as a whole (the old one is removed just
    before the rename: the only moment at which neither is there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path, directory)
    try:
        write(str(tmp))
        if directory and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return path


def _new_temp(path: Path, directory: bool) -> Path:
    """A new, empty, uniquely named temp file or folder beside ``path`` (created exclusively)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            if directory:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """``Path.write_text``, atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding=encoding))


__all__ = ["atomic_write", "write_text"]
