"""Reading the users' text files (label-text sets, CSVs, captions): UTF-8, and readable when a line is not."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def read_text(file: Path, shown: str | Path | None = None) -> str:
    """The file as UTF-8 (a BOM dropped). A line that is not UTF-8 is read as Windows-1252, with one warning
    naming the file (`shown`, default the path) and counting such lines: real sets have them (TREC-6's training
    file has one Latin-1 byte in 5,452 lines; MR's rt-polarity files are Latin-1 throughout), and decoding line by
    line keeps every other line's UTF-8."""
    data = Path(file).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    lines, legacy = [], []
    for number, line in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(keepends=True), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("cp1252", errors="replace"))
            legacy.append(number)
    log.warning("%s: %d lines are not UTF-8 (the first: line %d); they were read as Windows-1252",
                file if shown is None else shown, len(legacy), legacy[0])
    return "".join(lines)
