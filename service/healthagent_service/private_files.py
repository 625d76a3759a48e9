"""Files that hold health data, made readable by this user only whatever the umask: the
history's and the agent server's SQLite databases share it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def private_file(path: Path) -> None:
    """Create the data directory (0700) and the database file (0600) readable by this user
    only, whatever the umask: the databases hold health conversations. A directory that
    already exists keeps its mode (an operator may have set it); the database is made 0600."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another worker made it meanwhile
            directory.mkdir(mode=0o700)
            os.chmod(directory, 0o700)  # mkdir's mode passes through the umask
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
    finally:
        os.close(descriptor)
