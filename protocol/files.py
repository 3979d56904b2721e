"""Private files and folders whatever the umask: folders 0700, files 0600.

The agent's data folder, slots, outbox, prediction log and device key, and the fleet
server's registry, artifact store and drift tables are created through these helpers, so a
permissive umask (0o022, 0o000) never leaves them readable by other users.
"""

from __future__ import annotations

import os
from pathlib import Path


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed; the leaf folder ends up 0700."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def private_file(path: Path) -> Path:
    """Create ``path`` empty if missing; make it 0600 (also when it already existed)."""
    path = Path(path)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    return path
