"""A content-addressed store on disk: ``{root}/{sha[:2]}/{sha}``, written atomically.

Bundles are stored by the sha256 of their bytes; a write goes to a temporary file in the
same directory and is renamed into place, so a reader never sees half a file. Folders are
0700 and files 0600 whatever the umask. An upload streams into :meth:`ArtifactStore.temp`
(capped by the caller) and is adopted by :meth:`ArtifactStore.adopt` once it verified.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from .errors import InvalidInput, NotFound, StorageError
from .files import private_dir

_SHA = re.compile(r"^[0-9a-f]{64}$")


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            private_dir(self.root)
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
            private_dir(target.parent)
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

    def temp(self) -> Path:
        """A new empty 0600 file in the store (same filesystem: adopt() renames it)."""
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        except OSError as exc:
            raise StorageError(f"cannot create an upload file: {exc.strerror}") from None
        os.close(fd)
        return Path(tmp)

    def adopt(self, tmp: Path, sha256: str) -> str:
        """Move a verified upload into place under its sha256 (idempotent)."""
        target = self.path(sha256)
        try:
            if target.exists():
                Path(tmp).unlink(missing_ok=True)
                return sha256
            private_dir(target.parent)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageError(f"cannot store artifact {sha256}: {exc.strerror}") from None
        return sha256

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
