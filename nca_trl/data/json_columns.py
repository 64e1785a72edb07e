"""Columns that `datasets` reads as JSON values, refused before anything else reads them.

A JSON file column whose values change type across rows (a number in one row, a string in another; a string prompt
in one row, a list of messages in another) is read by `datasets` as JSON values (a `Json` feature): each value is
decoded as JSON, so the text `"4"` becomes the number 4, `"null"` becomes None, and a string among numbers passes as
a number, without a word. Every column a layout reads as text or as a number (`prompt`, `chosen`, `rejected`,
`instruction`, `A0..`, the score columns, `preference_pair`; `completions` and `rewards` at their elements) is checked
for that and refused, naming the first line of a JSON Lines file whose value differs in type from the first row's.
A column of messages or of UltraFeedback's completion dicts may be JSON values inside (each message or dict whole):
those decode to what was written and are left alone, as are `tools` and `chat_template_kwargs`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from datasets.utils.json import ujson_loads

from .datafiles import DataFileError
from .formats import PAIR_COLUMN, _short

__all__ = ["check_json_columns", "check_json_strings"]

_NUMBERS = re.compile(r"^(rewards|A\d+_score|score_A\d+)$")
_VALUES = re.compile(r"^(prompt|chosen|rejected|instruction|A\d+|A\d+_score|score_A\d+)$")


def _is_json(feature) -> bool:
    return type(feature).__name__ == "Json"


def json_read_columns(features) -> list[str]:
    """The columns of `features` that a layout reads and `datasets` reads as JSON values at the level read."""
    names = list(features)
    ultrafeedback = "instruction" in names and "prompt" not in names  # its completions are dicts
    found = []
    for name, feature in features.items():
        if _VALUES.match(name) or name == PAIR_COLUMN:
            bad = _is_json(feature)
        elif name == "rewards" or (name == "completions" and not ultrafeedback):
            bad = _is_json(feature) or _is_json(getattr(feature, "feature", None))  # List(Json): the elements
        else:
            bad = False
        if bad:
            found.append(name)
    return found


def _type(value) -> str | None:
    if value is None:
        return None  # null fits any type
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _rows(path: Path):
    """(line, row) of a JSON Lines file, or of one JSON document holding a list of rows (line None)."""
    try:
        with open(path, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield number, json.loads(line)
    except ValueError:  # one JSON document, not JSON Lines
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            return
        for row in document if isinstance(document, list) else []:
            yield None, row


def _first_differing_line(path: Path, column: str):
    """`((line, type), (line, position or None, type, value))`: the first value of `column` in a JSON Lines file and
    the first whose type differs from it (for `completions` and `rewards`, their elements); None if none is found
    (or the file is one JSON document, which has no lines to name)."""
    listed = column in ("completions", "rewards")
    first = None
    for number, row in _rows(path):
        if number is None:
            return None
        if not isinstance(row, dict) or row.get(column) is None:
            continue
        value = row[column]
        values = enumerate(value) if listed and isinstance(value, list) else [(None, value)]
        for position, item in values:
            kind = _type(item)
            if kind is None:
                continue
            if first is None:
                first = (number, kind)
            elif kind != first[1]:
                return first, (number, position, kind, item)
    return None


def _json_file(source: str | None) -> Path | None:
    """`source` as a path if it is a JSON or JSON Lines file (whose text can be read back), else None."""
    path = Path(source) if source else None
    return path if path is not None and path.is_file() and path.suffix.lower() in (".json", ".jsonl") else None


def check_json_columns(dataset, source: str | None) -> None:
    """Raises a `DataFileError` for the first column a layout reads that `datasets` read as JSON values (see the
    module), naming the line of the JSON Lines file `source` where its type first differs from the first row's."""
    found = json_read_columns(getattr(dataset, "features", None) or {})
    if not found:
        return
    column = found[0]
    path = _json_file(source)
    lines = _first_differing_line(path, column) if path is not None else None
    numbers = bool(_NUMBERS.match(column))
    kinds = set()
    if lines:
        (line0, kind0), (line, position, kind, value) = lines
        at = f" (position {position})" if position is not None else ""
        where = f"holds {kind0} in line {line0} but {kind} in line {line}{at}: {_short(value)}"
        kinds = {kind0, kind} - {"a number"}
    else:
        line = None
        where = "changes type across rows"
    if numbers:  # what is among the numbers: a string, or a boolean, list or object (not "strings" for those)
        other = " or ".join(k[2:] if k.startswith("a ") else k[3:] for k in sorted(kinds)) or "string"
        meaning = f"{'strings or other values' if not kinds else other + 's'} among numbers"
        fix = "write every reward and score as one plain number (not a string, boolean, list or object)"
    else:
        meaning = "mixed standard/conversational styles, or text among numbers or lists"
        fix = ("use one style for the whole file: every prompt and completion a string (standard), or every one a "
               "list of {'role', 'content'} messages (conversational); write every text as a JSON string")
    raise DataFileError(
        f"{source or 'the data'}: column '{column}' {where} ({meaning}), which `datasets` reads as "
        "JSON values, turning the text \"4\" into the number 4 and \"null\" into None without a word. Fix: " + fix + ".",
        path=source, line=line,
    )


def check_json_strings(dataset, source: str | None) -> None:
    """Raises a `DataFileError` for a string of any column (or of a list column's elements) that `datasets` read as
    JSON values and would give back as another value: `"0056"` as 56, `"true"` as True, `"null"` as None. For
    `nca-trl generate` and `score`, which carry every column to their output and to reward functions. Only a JSON
    file `source` can be checked (its text is what was written)."""
    features = getattr(dataset, "features", None) or {}
    columns = {name: _is_json(getattr(feature, "feature", None)) for name, feature in features.items()
               if _is_json(feature) or _is_json(getattr(feature, "feature", None))}  # name -> at its elements
    path = _json_file(source)
    if not columns or path is None:
        return
    for line, row in _rows(path):
        for name, elements in columns.items():
            value = row.get(name) if isinstance(row, dict) else None
            for item in (value if elements and isinstance(value, list) else [value]):
                if not isinstance(item, str):
                    continue
                try:
                    read = ujson_loads(item)  # as `datasets.Json` decodes it (also "0056" -> 56, "NaN" -> None)
                except ValueError:
                    continue
                where = f"line {line}" if line is not None else "a row"
                raise DataFileError(
                    f"{source}, {where}, column '{name}': the text {_short(item)} would be read as {read!r}. The "
                    "column's values change type across rows, so `datasets` reads them as JSON values and decodes "
                    "such text. Fix: give the column one type in every row (e.g. every value a string), or remove it.",
                    path=source, line=line,
                )
