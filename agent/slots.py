"""Installed bundles on disk: one slot per version, an atomically written state file.

Layout under ``root`` (``data_dir/slots``)::

    slots/
      state.json            {"active": "r00000003-ab12…", "order": [oldest … newest]}
      r00000002-0f1e2d3c4b5a/bundle.efb
      r00000003-ab12cd34ef56/bundle.efb

A slot keeps the whole signed bundle, so it can be re-checked at start. Durability rules
(power loss at any instant leaves either the old state or the new one):

* a slot is written into ``.tmp-*`` (write → fsync the file → fsync the directory) and then
  renamed to its final name, and the parent directory is fsynced;
* ``state.json`` is written to a temp file, fsynced, renamed over the old one, and the
  directory is fsynced; it only ever names slots that are complete.

On start :meth:`Slots.load_active` re-checks the active slot's file hashes; a missing or
corrupt slot falls back to the newest earlier slot that verifies (and the state is
rewritten to say so). :meth:`Slots.activate` keeps the active slot plus ``keep_previous``
slots installed before it and deletes the rest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from protocol.bundle import Bundle, check_files, read_bundle
from protocol.errors import BundleError, EdgefleetError
from protocol.files import private_dir
from protocol.manifest import Manifest

from .errors import SlotError

BUNDLE_FILE = "bundle.efb"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class LoadedSlot:
    slot_id: str
    manifest: Manifest
    bundle: Bundle

    @property
    def model_bytes(self) -> bytes:
        return self.bundle.members[self.manifest.model.path]


def slot_id_for(manifest: Manifest) -> str:
    return f"r{manifest.release:08d}-{manifest.file(manifest.model.path).sha256[:12]}"


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync one file (tests replace this to simulate a full disk)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """temp file in the same directory → fsync → rename → fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    os.close(fd)
    try:
        _write_bytes(Path(tmp), data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class Slots:
    """Versioned bundles on disk with one active slot."""

    def __init__(self, root: Path, keep_previous: int = 2) -> None:
        self.root = Path(root)
        self.keep_previous = keep_previous
        # Set by load_active() when the active slot was unusable: (bad slot, why).
        self.recovered_from: tuple[str, str] | None = None

    # -- state -------------------------------------------------------------------------
    def _state(self) -> dict:
        path = self.root / STATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"active": None, "order": []}
        except (OSError, ValueError):
            # A torn or garbled state file: rebuild the order from the slot directories.
            return {"active": None, "order": self._scan()}
        if not isinstance(state, dict) or not isinstance(state.get("order"), list):
            return {"active": None, "order": self._scan()}
        return state

    def _scan(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith("r"))

    def _write_state(self, active: str | None, order: list[str]) -> None:
        private_dir(self.root)
        atomic_write(
            self.root / STATE_FILE, json.dumps({"active": active, "order": order}).encode()
        )

    def active_id(self) -> str | None:
        return self._state().get("active")

    def order(self) -> list[str]:
        """Slot ids in install order, oldest first."""
        return [s for s in self._state()["order"] if (self.root / s / BUNDLE_FILE).is_file()]

    # -- slots -------------------------------------------------------------------------
    def write(self, bundle_bytes: bytes, manifest: Manifest) -> str:
        """Store a verified bundle in its own slot (idempotent); return the slot id.

        Raises ``OSError`` (e.g. ENOSPC) with nothing half-written left behind.
        """
        slot = slot_id_for(manifest)
        final = self.root / slot
        if (final / BUNDLE_FILE).is_file():
            return slot
        private_dir(self.root)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            _write_bytes(tmp / BUNDLE_FILE, bundle_bytes)
            _fsync_dir(tmp)
            if final.exists():  # a leftover without its bundle file
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.root)
        return slot

    def load(self, slot: str) -> LoadedSlot:
        """Read a slot and re-check every file hash; raise :class:`SlotError` if unusable."""
        path = self.root / slot / BUNDLE_FILE
        try:
            bundle = read_bundle(path)
            manifest = bundle.manifest
            check_files(manifest, bundle.members)
        except (BundleError, EdgefleetError) as exc:
            raise SlotError(f"slot {slot} is unusable: {exc}") from None
        return LoadedSlot(slot, manifest, bundle)

    def activate(self, slot: str) -> None:
        """Make ``slot`` active (appending it to the install order) and prune old slots."""
        order = [s for s in self.order() if s != slot] + [slot]
        keep = set(order[-(self.keep_previous + 1) :])
        order = [s for s in order if s in keep]
        self._write_state(slot, order)
        self._prune(keep)

    def switch(self, slot: str) -> None:
        """Make an existing slot active without changing the install order (rollback)."""
        order = self.order()
        if slot not in order:
            raise SlotError(f"slot {slot} is not installed")
        self._write_state(slot, order)

    def _prune(self, keep: set[str]) -> None:
        for p in self.root.iterdir():
            if p.is_dir() and p.name not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def previous_id(self, slot: str | None = None) -> str | None:
        """The slot installed just before ``slot`` (default: the active one)."""
        order = self.order()
        slot = slot or self.active_id()
        if slot not in order:
            return None
        i = order.index(slot)
        return order[i - 1] if i > 0 else None

    def load_active(self) -> LoadedSlot | None:
        """The active slot, or the newest earlier slot that verifies when it is corrupt."""
        self.recovered_from = None
        state = self._state()
        order = [s for s in state["order"] if isinstance(s, str)]
        active = state.get("active")
        if active is None and not order:
            return None
        candidates = order[: order.index(active) + 1] if active in order else order
        for slot in reversed(candidates):
            try:
                loaded = self.load(slot)
            except SlotError as exc:
                if self.recovered_from is None:
                    self.recovered_from = (slot, str(exc))
                continue
            if slot != active:
                if self.recovered_from is None:
                    self.recovered_from = (str(active), "active slot is missing")
                self._write_state(slot, [s for s in order if (self.root / s).is_dir()])
            return loaded
        return None
