"""One open drift window held in memory: decoded sketches merged report by report.

Decoding, merging and re-encoding a whole window for every report costs O(features) of
(de)serialisation per message; holding the decoded DataSketches objects and serialising
only when the window is written (:meth:`OpenWindow.to_row`) makes ingest one decode plus
one C++ merge per feature. The engine writes dirty windows together with the report keys
they absorbed, in one transaction, so the stored window and the "seen" keys never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import ProtocolError
from protocol.sketches import FeatureSketch, SketchSet, encode


@dataclass
class _Acc:
    kind: str
    sketch: Any
    count: int
    missing: int
    out_of_range: int


def decode_set(sketches: SketchSet) -> dict[str, _Acc]:
    """Decode every feature sketch; :class:`ProtocolError` names the first bad one."""
    out: dict[str, _Acc] = {}
    for name, fs in sketches.features.items():
        try:
            sk = fs.kll() if fs.kind == "numeric" else fs.frequent()
        except ProtocolError as exc:
            raise ProtocolError(f"sketch of {name!r}: {exc}") from None
        out[name] = _Acc(fs.kind, sk, fs.count, fs.missing, fs.out_of_range)
    return out


@dataclass
class OpenWindow:
    model: str
    version: str
    window: float
    features: dict[str, _Acc] = field(default_factory=dict)
    rows: int = 0
    devices: set[str] = field(default_factory=set)
    revision: int = 0
    evaluated_revision: int = -1
    alerted: int = 0
    pending: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> OpenWindow:
        return cls(
            model=row["model"],
            version=row["version"],
            window=row["window"],
            features=decode_set(SketchSet.model_validate_json(row["sketch"])),
            rows=row["rows"],
            devices=set(json.loads(row["devices"])),
            revision=row["revision"],
            evaluated_revision=row["evaluated_revision"],
            alerted=row["alerted"],
        )

    def check(self, incoming: dict[str, _Acc]) -> None:
        """Refuse a report whose feature kinds differ from the window's (before any merge)."""
        for name, acc in incoming.items():
            have = self.features.get(name)
            if have is not None and have.kind != acc.kind:
                raise ProtocolError(
                    f"sketch of {name!r}: {acc.kind} here but {have.kind} in the window"
                )

    def add(self, device: str, rows: int, incoming: dict[str, _Acc], key: dict[str, Any]) -> None:
        for name, acc in incoming.items():
            have = self.features.get(name)
            if have is None:
                self.features[name] = acc
                continue
            have.sketch.merge(acc.sketch)
            have.count += acc.count
            have.missing += acc.missing
            have.out_of_range += acc.out_of_range
        self.rows += rows
        self.devices.add(device)
        self.revision += 1
        self.pending.append(key)

    def sketch_set(self) -> SketchSet:
        feats = {
            name: FeatureSketch(
                kind=a.kind,  # type: ignore[arg-type]
                sketch=encode(a.sketch),
                count=a.count,
                missing=a.missing,
                out_of_range=a.out_of_range,
            )
            for name, a in sorted(self.features.items())
        }
        return SketchSet(rows=self.rows, features=feats)

    def to_row(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "window": self.window,
            "sketch": self.sketch_set().model_dump_json(),
            "rows": self.rows,
            "devices": json.dumps(sorted(self.devices)),
            "revision": self.revision,
            "evaluated_revision": self.evaluated_revision,
            "alerted": self.alerted,
        }
