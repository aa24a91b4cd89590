"""Where every benchmark writes: `<stem>.json` (all numbers) and `<stem>.md` (the table), then prints it."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(stem: str | Path, data: dict, table: str) -> None:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1))
    stem.with_suffix(".md").write_text(table)
    print(table)
