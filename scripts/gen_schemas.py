"""Write the JSON Schema of every topic's payload to protocol/schemas/ (or check them).

    python scripts/gen_schemas.py           # regenerate after changing protocol/messages.py
    python scripts/gen_schemas.py --check   # exit 1 when the committed files are stale

The files are generated from the pydantic models (protocol.jsonschema.schema_files()), so
subscribers written in other languages can validate payloads without reading Python.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocol.jsonschema import schema_files  # noqa: E402 - after the path fix above

OUT = ROOT / "protocol" / "schemas"


def stale(out: Path = OUT) -> list[str]:
    """Names of schema files that are missing, differ, or should not be there."""
    want = schema_files()
    have = {p.name for p in out.glob("*.schema.json")} if out.is_dir() else set()
    bad = [
        n for n, text in want.items() if not (out / n).is_file() or (out / n).read_text() != text
    ]
    return sorted(bad + [n for n in have - set(want)])


def write(out: Path = OUT) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    files = schema_files()
    for name, text in files.items():
        (out / name).write_text(text)
    for extra in {p.name for p in out.glob("*.schema.json")} - set(files):
        (out / extra).unlink()
    return sorted(files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        for name in bad:
            sys.stderr.write(
                f"stale: protocol/schemas/{name} (run python scripts/gen_schemas.py)\n"
            )
        return 1 if bad else 0
    for name in write():
        sys.stdout.write(f"wrote protocol/schemas/{name}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
