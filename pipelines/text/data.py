"""Text-classification data: single sentences or sentence pairs from CSV, TSV, JSONL or "label text" lines.

Labels are mapped to ids from the training file (numeric labels keep their numeric order, names their
sorted order), so the validation file can never invent a class. Every problem names the file, the line
and the flag: a wrong column, an unknown label, an empty file. Tokenisation truncates to `max_length` and
says how many examples were cut, because silently dropping the end of a premise changes the task.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamlora.errors import DataError
from pipelines.trainer.text_files import read_text

log = logging.getLogger(__name__)

FORMATS = ("csv", "tsv", "jsonl", "label_text")
SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "label_text"}
TEXT_COLUMN_GUESSES = ("text", "sentence", "sentence1", "question", "premise")
PAIR_COLUMN_GUESSES = {"sentence1": "sentence2", "question": "sentence", "premise": "hypothesis"}


@dataclass
class Columns:
    text: str | None = None
    pair: str | None = None
    label: str = "label"


@dataclass
class TextExamples:
    texts: list[str]
    pairs: list[str] | None  # second sentence of each pair, None for single-sentence tasks
    labels: list[int]
    source: str  # file name, for messages

    def __len__(self) -> int:
        return len(self.texts)


def data_format(path: str | Path, given: str | None, flag: str) -> str:
    if given:
        return given
    fmt = SUFFIX_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(f"{flag} {path}: cannot tell the format from the suffix; pass --data_format "
                        f"({', '.join(FORMATS)})")
    return fmt


def read_rows(path: str | Path, fmt: str, flag: str) -> list[tuple[int, dict]]:
    """(line number, row) pairs. `label_text` rows are {"label", "text"}: the first token is the label."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{flag} {path}: no such file")
    with io.StringIO(read_text(file, path), newline="") as f:
        if fmt in ("csv", "tsv"):
            # GLUE TSVs contain unbalanced quotes inside sentences, so TSV is read without quoting.
            reader = (csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv"
                      else csv.DictReader(f))
            rows = [(reader.line_num, row) for row in reader]
        elif fmt == "jsonl":
            rows = []
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{flag} {path} line {number}: not JSON ({e.msg})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{flag} {path} line {number}: expected a JSON object per line")
                    rows.append((number, row))
        elif fmt == "label_text":
            rows = read_label_text(f, path)
        else:
            raise DataError(f"--data_format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not rows:
        raise DataError(f"{flag} {path}: no examples in the file")
    return rows


def read_label_text(lines, path) -> list[tuple[int, dict]]:
    """'<label> <text>' lines; blank lines are skipped. A label with an empty text is an example (real sets
    have them: CR has one in 3,775), counted in one warning."""
    rows, empty = [], 0
    for number, line in enumerate(lines, start=1):
        parts = line.strip().split(maxsplit=1)
        if parts:
            empty += len(parts) == 1
            rows.append((number, {"label": parts[0], "text": parts[1] if len(parts) == 2 else ""}))
    if empty:
        log.warning("%s: %d lines have a label and an empty text; they are kept as empty examples", path, empty)
    return rows


def resolve_columns(rows: list[tuple[int, dict]], given: Columns, path: str | Path, flag: str) -> Columns:
    """Fill unset column names from common conventions (text / sentence / sentence1+sentence2 ...)."""
    available = list(rows[0][1])
    text = given.text or next((c for c in TEXT_COLUMN_GUESSES if c in available), None)
    if text is None:
        raise DataError(f"{flag} {path}: no text column among {available}; pass --text_column")
    pair = given.pair
    if pair is None and given.text is None and PAIR_COLUMN_GUESSES.get(text) in available:
        pair = PAIR_COLUMN_GUESSES[text]
    for option, name in (("--text_column", text), ("--text_pair_column", pair), ("--label_column", given.label)):
        if name is not None and name not in available:
            raise DataError(f"{flag} {path}: {option} {name!r} is not a column; columns are {available}")
    return Columns(text=text, pair=pair, label=given.label)


def label_names(raw_labels: list[str]) -> list[str]:
    """The classes in id order: numeric labels by value (so "0","1" stay 0, 1), names alphabetically."""
    unique = set(raw_labels)
    try:
        return sorted(unique, key=float)
    except ValueError:
        return sorted(unique)


def read_examples(path: str | Path, flag: str, fmt: str | None, columns: Columns,
                  labels: list[str] | None = None) -> tuple[TextExamples, list[str]]:
    """Read one split. `labels` (the training file's classes) is None for the training file itself."""
    fmt = data_format(path, fmt, flag)
    rows = read_rows(path, fmt, flag)
    if fmt == "label_text" and (columns.text or columns.pair):
        raise DataError(f"{flag} {path}: 'label text' lines have no named columns; drop --text_column/"
                        f"--text_pair_column or pick another --data_format")
    cols = Columns(label="label", text="text") if fmt == "label_text" else resolve_columns(rows, columns, path, flag)
    texts, pairs, raw = [], [], []
    for number, row in rows:
        values = [row.get(cols.text), row.get(cols.pair) if cols.pair else "", row.get(cols.label)]
        if any(v is None for v in values):
            raise DataError(f"{flag} {path} line {number}: missing a value for column "
                            f"{[cols.text, cols.pair, cols.label][values.index(None)]!r}")
        texts.append(str(values[0]))
        pairs.append(str(values[1]))
        raw.append(str(values[2]).strip())
    names = labels if labels is not None else label_names(raw)
    index = {name: i for i, name in enumerate(names)}
    unknown = [(number, label) for (number, _), label in zip(rows, raw, strict=True) if label not in index]
    if unknown:
        number, label = unknown[0]
        raise DataError(f"{flag} {path} line {number}: label {label!r} is not one of the training labels {names} "
                        f"({len(unknown)} such rows)")
    if labels is None and len(names) < 2:
        raise DataError(f"{flag} {path}: only one label ({names[0]!r}); classification needs at least two")
    examples = TextExamples(texts, pairs if cols.pair else None, [index[label] for label in raw], str(path))
    return examples, names


def tokenize(tokenizer, examples: TextExamples, max_length: int) -> list[dict]:
    """Token ids per example (unpadded), truncated to `max_length` with one warning counting the cuts."""
    args = (examples.texts, examples.pairs) if examples.pairs is not None else (examples.texts,)
    encoded = tokenizer(*args, truncation=False)
    cut = sum(len(ids) > max_length for ids in encoded["input_ids"])
    if cut:
        log.warning("%s: %d of %d examples are longer than --max_length %d tokens and were truncated",
                    examples.source, cut, len(examples), max_length)
        encoded = tokenizer(*args, truncation=True, max_length=max_length)  # pairs: the longer side is cut
    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded]
    return [{**{k: encoded[k][i] for k in keys}, "labels": examples.labels[i]} for i in range(len(examples))]


class PadCollator:
    """Pads a batch to its longest member (dynamic padding): short SST-2 sentences do not pay for 128 tokens."""

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        self.pad, self.left = pad_token_id, padding_side == "left"

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(it["input_ids"]) for it in items)
        batch = {}
        for key, fill in (("input_ids", self.pad), ("token_type_ids", 0), ("attention_mask", 0)):
            if key in items[0]:
                rows = [self._pad(it[key], width, fill) for it in items]
                batch[key] = torch.tensor(rows, dtype=torch.long)
        batch["labels"] = torch.tensor([it["labels"] for it in items], dtype=torch.long)
        return batch

    def _pad(self, values: list[int], width: int, fill: int) -> list[int]:
        padding = [fill] * (width - len(values))
        return padding + list(values) if self.left else list(values) + padding
