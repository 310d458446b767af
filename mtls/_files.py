"""File-change stamps: notice that a watched file was replaced or rewritten.

Shared by every reloader in AXID (SVID and bundle files, verifier JWKS and
bundle files, the issuer keyring); mtls is the bottom layer all of them import.
A stamp is compared, never interpreted: equal stamps mean "nothing to reload".
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["FileStamp", "file_stamp", "file_stamps"]

FileStamp = tuple[int, int, int]


def file_stamp(path: str | os.PathLike[str], *, only_missing: bool = False) -> FileStamp | None:
    """(mtime_ns, size, inode) of the file ``path`` names, following symlinks (Kubernetes
    swaps a ``..data`` symlink); None if it cannot be stat'ed (``only_missing``: if it
    does not exist; other errors then raise)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError:
        if only_missing:
            raise
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def file_stamps(paths: Iterable[str | os.PathLike[str]]) -> tuple[FileStamp | None, ...]:
    """The :func:`file_stamp` of each path, in order."""
    return tuple(file_stamp(p) for p in paths)
