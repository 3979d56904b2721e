"""Keyset (cursor) pagination shared by both registry backends. No I/O.

A list is read in a fixed total order (:class:`Keyset`: sort columns, the last one unique)
and a page is ``limit`` rows after a position. The position travels to the client as an
opaque cursor: base64url of ``["devices", [last row's sort values]]``. Because the next page
starts strictly after the last row shown, rows inserted between two page reads never make a
row that existed before appear twice or go missing; a new row shows up on a later page when
it sorts after the position, and not at all when it sorts before (newest-first lists start
again from the top to see it).

The dashboard also walks back: a ``before`` position reads the page that ends just before
it (the same order, read backwards and turned round), and :attr:`Page.prev_cursor` is that
position for the page in hand. The API offers ``cursor`` only.

A cursor is client input: :meth:`Keyset.decode` checks its size before decoding, then its
shape, list kind, arity and every value's type (and range: finite, within 64 bits) against
the column's, and answers :class:`~.errors.InvalidInput` naming ``cursor``. It is a
position, not a credential: a forged one only moves where a listing the caller may already
read starts.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput

MAX_LIMIT = 1000
MAX_CURSOR_CHARS = 512
_MAX_TEXT = 256
_MIN_INT, _MAX_INT = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Page:
    """One page of a list; ``next_cursor`` is None on the last page. ``prev_cursor``, when
    set, is a ``before`` position that reads the page preceding this one."""

    items: list[dict[str, Any]]
    next_cursor: str | None
    prev_cursor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items, "next_cursor": self.next_cursor}


@dataclass(frozen=True)
class Keyset:
    kind: str
    columns: tuple[tuple[str, type], ...]  # (name, python type); the last one is unique
    descending: bool

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    def order_by(self, backwards: bool = False) -> str:
        direction = " desc" if self.descending != backwards else ""
        return ", ".join(f'"{n}"{direction}' for n in self.names)

    def after(self, mark: str, backwards: bool = False) -> str:
        """The WHERE condition "sorts after the cursor" (``backwards``: before it), with
        ``mark`` as placeholder."""
        op = "<" if self.descending != backwards else ">"
        if len(self.columns) == 1:
            return f'"{self.names[0]}" {op} {mark}'
        cols = ", ".join(f'"{n}"' for n in self.names)
        return f"({cols}) {op} ({', '.join([mark] * len(self.columns))})"

    def encode(self, row: dict[str, Any]) -> str:
        raw = json.dumps([self.kind, [row[n] for n in self.names]], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    def decode(self, cursor: str) -> list[Any]:
        def bad(why: str) -> InvalidInput:
            return InvalidInput(f"cursor: {why}", field="cursor")

        if not isinstance(cursor, str) or not 0 < len(cursor) <= MAX_CURSOR_CHARS:
            raise bad(f"must be 1–{MAX_CURSOR_CHARS} characters")
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            doc = json.loads(raw, parse_constant=_no_constant)
        except (binascii.Error, ValueError):
            raise bad("not a cursor this server issued") from None
        if (
            not isinstance(doc, list)
            or len(doc) != 2
            or doc[0] != self.kind
            or not isinstance(doc[1], list)
            or len(doc[1]) != len(self.columns)
        ):
            raise bad(f"not a cursor for the {self.kind} list")
        values = doc[1]
        for (name, typ), value in zip(self.columns, values, strict=True):
            ok = (
                isinstance(value, str) and len(value) <= _MAX_TEXT
                if typ is str
                else isinstance(value, (int, float) if typ is float else int)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and _MIN_INT <= value <= _MAX_INT  # what a 64-bit column can be compared with
            )
            if not ok:
                raise bad(f"bad value for {name}")
        return values

    def page(self, rows: list[dict[str, Any]], limit: int) -> Page:
        """``rows`` were read with ``limit + 1``: the extra row only says there is more."""
        if len(rows) > limit:
            rows = rows[:limit]
            return Page(rows, self.encode(rows[-1]))
        return Page(rows, None)

    def page_before(self, rows: list[dict[str, Any]], limit: int) -> Page:
        """``rows`` were read backwards from a ``before`` position with ``limit + 1``."""
        more = len(rows) > limit
        rows = list(reversed(rows[:limit]))
        if not rows:
            return Page([], None)
        return Page(rows, self.encode(rows[-1]), self.encode(rows[0]) if more else None)


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be an integer from 1 to {MAX_LIMIT}", field="limit")
    return limit


DEVICES = Keyset("devices", (("device_id", str),), descending=False)
BUNDLES = Keyset("bundles", (("uploaded_at", float), ("sha256", str)), descending=True)
ROLLOUTS = Keyset("rollouts", (("created_at", float), ("rollout_id", str)), descending=True)
EVENTS = Keyset("events", (("id", int),), descending=True)
AUDIT = Keyset("audit", (("id", int),), descending=True)
DRIFT = Keyset("drift", (("evaluated_at", float), ("id", int)), descending=True)

# The API's page sizes (``?limit=``): DEFAULT_LIMIT when absent, at most MAX_LIMIT.
DEFAULT_LIMIT = 100


def device_filters(
    profile: str | None, version: str | None, online: bool | None
) -> list[tuple[str, Any]]:
    """Column filters of a device page (both backends); the tag filter is backend SQL."""
    pairs: list[tuple[str, Any]] = [("profile", profile), ("version", version)]
    out = [(col, value) for col, value in pairs if value]
    if online is not None:
        out.append(("online", int(online)))
    return out


def counts_from_groups(groups: list[tuple[Any, Any, Any, Any, int]]) -> dict[str, Any]:
    """The overview's device counts from the per-group rows (profile, model, version, online),
    in the shape the overview uses: ``{"devices": n, "by": {"profile": …, "version": …,
    "online": …}}``. A key appears only when its count is above zero; a device without a
    profile counts as "?", one without a model as "-"."""
    by: dict[str, dict[str, int]] = {"profile": {}, "version": {}, "online": {}}
    total = 0
    for profile, model, version, online, n in groups:
        total += n
        for dim, key in (
            ("profile", profile or "?"),
            ("version", f"{model or '-'} {version or ''}".strip()),
            ("online", "online" if online else "offline"),
        ):
            by[dim][key] = by[dim].get(key, 0) + n
    return {"devices": total, "by": by}


def drift_results_query(
    model: str | None, version: str | None, limit: int, cursor: str | None, mark: str
) -> tuple[str, list[Any]]:
    """One page of ``drift_results`` (both backends): the SQL with ``mark`` as the
    placeholder (``?`` or ``%s``) and its parameters; ``limit + 1`` rows tell whether a
    next page exists (:meth:`Keyset.page`)."""
    check_limit(limit)
    where, params = [], []
    for col, value in (("model", model), ("version", version)):
        if value is not None:
            where.append(f"{col} = {mark}")
            params.append(value)
    if cursor is not None:
        where.append(DRIFT.after(mark))
        params += DRIFT.decode(cursor)
    sql = "select * from drift_results"
    if where:
        sql += " where " + " and ".join(where)
    return sql + f" order by {DRIFT.order_by()} limit {mark}", [*params, limit + 1]
