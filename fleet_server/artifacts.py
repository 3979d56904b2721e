"""A content-addressed store on disk: ``{root}/{sha[:2]}/{sha}``, written atomically.

Bundles are stored by the sha256 of their bytes; a write goes to a temporary file in the
same directory and is renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from .errors import InvalidInput, NotFound, StorageError

_SHA = re.compile(r"^[0-9a-f]{64}$")


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create artifact store {self.root}: {exc.strerror}"
            ) from None

    def path(self, sha256: str) -> Path:
        if not _SHA.match(sha256):
            raise InvalidInput(f"{sha256!r} is not a sha256 hex digest", field="sha256")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if target.exists():
            return sha
        try:
            target.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"cannot store artifact {sha}: {exc.strerror}") from None
        return sha

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def get(self, sha256: str) -> bytes:
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no artifact {sha256}", field="sha256") from None
        except OSError as exc:
            raise StorageError(f"cannot read artifact {sha256}: {exc.strerror}") from None

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"no artifact {sha256}", field="sha256") from None
