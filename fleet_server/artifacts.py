"""A content-addressed store on disk: ``{root}/{sha[:2]}/{sha}``, written atomically.

Bundles are stored by the sha256 of their bytes; a write goes to a temporary file in the
same directory and is renamed into place, so a reader never sees half a file. Folders are
0700 and files 0600 whatever the umask. An upload streams into :meth:`ArtifactStore.temp`
(capped by the caller) and is adopted by :meth:`ArtifactStore.adopt` once it verified.

Several server processes: with a registry that shares artifacts (PostgreSQL,
``Repository.shares_artifacts``), every artifact stored here is also written to the
registry in :data:`PART_BYTES` parts, and an artifact this process lacks is fetched from
the registry on first use, checked against its sha256 and size, and kept here as a cache.
So a bundle uploaded through one ``fleet serve`` can be published and served over HTTP by
any other on the same PostgreSQL, each with its own ``data_dir``. On SQLite (one machine)
the files here are the store and the registry holds no bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from protocol.files import private_dir

from .errors import InvalidInput, NotFound, StorageError

_SHA = re.compile(r"^[0-9a-f]{64}$")
PART_BYTES = 1024 * 1024  # an artifact's bytes go to the registry in parts of this size


class ArtifactStore:
    def __init__(self, root: Path, registry: Any = None) -> None:
        """``registry``: a :class:`~.repository.Repository`; used only when it shares
        artifacts between processes (``shares_artifacts``)."""
        self.root = Path(root)
        self.registry = registry if registry is not None and registry.shares_artifacts else None
        self.fetched = 0  # artifacts this process fetched from the registry
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
        self._share(sha)
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
        self._place(tmp, sha256)
        self._share(sha256)
        return sha256

    def _place(self, tmp: Path, sha256: str) -> None:
        target = self.path(sha256)
        try:
            if target.exists():
                Path(tmp).unlink(missing_ok=True)
                return
            private_dir(target.parent)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageError(f"cannot store artifact {sha256}: {exc.strerror}") from None

    # the registry (several processes) -------------------------------------------------
    def _parts(self, path: Path) -> Iterator[bytes]:
        with open(path, "rb") as fh:
            while block := fh.read(PART_BYTES):
                yield block

    def _share(self, sha256: str) -> None:
        """Write a stored artifact to a sharing registry (once; idempotent)."""
        if self.registry is None:
            return
        path = self.path(sha256)
        try:
            size = path.stat().st_size
            self.registry.put_artifact(sha256, size, self._parts(path))
        except OSError as exc:
            raise StorageError(f"cannot read artifact {sha256}: {exc.strerror}") from None

    def _fetch(self, sha256: str) -> bool:
        """Copy an artifact from a sharing registry into this store (checked); False when
        the registry does not have it either."""
        if self.registry is None:
            return False
        info = self.registry.artifact_info(sha256)
        if info is None:
            return False
        tmp = self.temp()
        h = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as fh:
                for part in range(int(info["parts"])):
                    data = self.registry.artifact_part(sha256, part)
                    if data is None:
                        raise StorageError(f"artifact {sha256}: part {part} is missing")
                    h.update(data)
                    size += len(data)
                    fh.write(data)
            if size != int(info["size"]) or h.hexdigest() != sha256:
                raise StorageError(f"artifact {sha256} in the registry does not match its sha256")
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"cannot cache artifact {sha256}: {exc.strerror}") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._place(tmp, sha256)  # (not shared back: it came from there)
        self.fetched += 1
        return True

    def _local(self, sha256: str) -> Path:
        path = self.path(sha256)
        if not path.is_file():
            self._fetch(sha256)
        return path

    def has(self, sha256: str) -> bool:
        return self._local(sha256).is_file()

    def get(self, sha256: str) -> bytes:
        try:
            return self._local(sha256).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no artifact {sha256}", field="sha256") from None
        except OSError as exc:
            raise StorageError(f"cannot read artifact {sha256}: {exc.strerror}") from None

    def size(self, sha256: str) -> int:
        try:
            return self._local(sha256).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"no artifact {sha256}", field="sha256") from None
