"""Local data files checked before `datasets` reads them, so that a broken file is reported by name (and line, where
the format has lines) as a [`DataFileError`] rather than a library traceback:

- an empty file is refused;
- JSON and JSON Lines: bytes that are not UTF-8 (with their line and byte offset), lines that are not JSON (a cut-off
  last line is reported as a truncated file), lines that are not objects, and numbers beyond float64 (`1e999`, which
  `datasets`' JSON reader refuses with a bare "Number too big to be stored in double");
- CSV: bytes that are not UTF-8; Parquet and Arrow: a footer / schema that cannot be read.

Each file is read once by the check, line by line (a JSON document that is not JSON Lines, e.g. one array of rows, is
parsed whole, as `datasets` does), before `datasets` reads it: cheap next to tokenization. Folders are checked in
`nca_trl.data.folders`, and loaded in `nca_trl.data.loading`.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
import math
from pathlib import Path

from ..runtime.errors import DataError

__all__ = ["FILE_BUILDERS", "DataFileError", "check_data_file"]

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

# Types of the files of a folder: FILE_BUILDERS and the other spellings `datasets` reads with the same builders
_FOLDER_BUILDERS = {**FILE_BUILDERS, ".ndjson": "json", ".geoparquet": "parquet", ".gpq": "parquet"}
_COMPRESSION = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_OTHER_COMPRESSION = (".zst", ".lz4", ".zip", ".tar")
_MAX_LISTED = 5


class DataFileError(DataError):
    """A local data file (or folder of data files) that cannot be loaded. The message names the file, the line where
    the format has lines, what is wrong and how to fix it; `path` and `line` (or None) hold the first two."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line


def _file_type(file: str | Path) -> str:
    """The data type of a file by its name, compression suffixes aside: `a.jsonl.gz` -> `.jsonl`."""
    suffixes = [s.lower() for s in Path(file).suffixes]
    while suffixes and suffixes[-1] in (*_COMPRESSION, *_OTHER_COMPRESSION):
        suffixes.pop()
    return suffixes[-1] if suffixes else "(no extension)"


def _listing(items: list, limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


class _NumberOutOfRange(Exception):
    def __init__(self, literal: str):
        super().__init__(literal)
        self.literal = literal


def _parse_float(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise _NumberOutOfRange(literal)
    return value


def _parse_int(literal: str) -> int:
    value = int(literal)
    try:
        float(value)  # datasets' JSON reader stores integers beyond int64 as float64: inf past its range
    except OverflowError:
        raise _NumberOutOfRange(literal if len(literal) <= 20 else f"{literal[:8]}...({len(literal)} digits)") from None
    return value


def _loads(text: str):
    return json.loads(text, parse_float=_parse_float, parse_int=_parse_int)


def _json_error(e: json.JSONDecodeError, line: bool = True) -> str:
    """The parser's message with where: `Expecting ',' delimiter at line 2, column 19`."""
    where = f"line {e.lineno}, column {e.colno}" if line else f"column {e.colno}"
    return f"{e.msg.removesuffix(' at')} at {where}"


def _open_binary(path: Path):
    return _COMPRESSION.get(path.suffix.lower(), open)(path, "rb")


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
_UTF8_FIX = (
    "the file must be UTF-8: convert it, e.g. `iconv -f latin1 -t utf-8 IN > OUT` if it was written as Latin-1, or "
    "`open(..., encoding='utf-8')` when writing it"
)
_RANGE_FIX = (
    "write a number within float64's range (about +-1.8e308; rewards only matter up to a common shift and the scale "
    "set by `alpha`, so rescale them), or remove the row"
)


class _Problems:
    """The problems found in one file: all counted, the first few kept for the message."""

    def __init__(self, path: Path):
        self.path = path
        self.lines: list[int] = []
        self.messages: list[str] = []
        self.fixes: list[str] = []

    def add(self, line: int, message: str, fix: str) -> None:
        self.lines.append(line)
        if len(self.messages) < _MAX_LISTED:
            self.messages.append(message)
        if fix not in self.fixes:
            self.fixes.append(fix)

    def raise_if_any(self) -> None:
        if not self.lines:
            return
        n = len(self.lines)
        head = f"{self.path}, line {self.lines[0]}: " if n == 1 else f"{self.path}: {n} bad lines ({_listing(self.lines)}): "
        message = head + "; ".join(self.messages) + (f"; ... ({n - _MAX_LISTED} more)" if n > _MAX_LISTED else "")
        raise DataFileError(f"{message}. Fix: {'. '.join(self.fixes)}.", path=self.path, line=self.lines[0])


def check_data_file(path: str | Path, builder: str | None = None) -> None:
    """Raise a [`DataFileError`] naming `path` (and the line) if `datasets` cannot read it as `builder` (`json`,
    `csv`, `parquet` or `arrow`; by default from the file's extension). One streaming pass over the file."""
    path = Path(path)
    builder = builder or _FOLDER_BUILDERS.get(_file_type(path))
    if path.stat().st_size == 0:
        raise DataFileError(
            f"{path} is empty (0 bytes). Fix: write the data into it (was it fully written or downloaded?), or remove "
            "it from the folder / the recipe.",
            path=path,
        )
    if path.suffix.lower() in _OTHER_COMPRESSION:
        return  # archives and codecs without a standard-library reader: datasets reports what it cannot read
    if builder == "json":
        _check_json_file(path)
    elif builder == "csv":
        problems, _, _, last_data_line = _scan_lines(path, parse_json=False)
        problems.raise_if_any()
        if last_data_line == 0:
            raise DataFileError(
                f"{path} holds no data: only blank lines. Fix: write the data into it, or remove it.", path=path
            )
    elif builder == "parquet":
        import pyarrow.parquet as pq

        try:
            pq.read_metadata(str(path))  # the footer only
        except Exception as e:  # noqa: BLE001
            raise DataFileError(
                f"{path} is not a readable Parquet file ({type(e).__name__}: {e}). Fix: write it again (e.g. "
                "`Dataset.to_parquet`); a file cut off while being written or downloaded has no footer.",
                path=path,
            ) from e
    elif builder == "arrow":
        import pyarrow as pa

        with open(path, "rb") as f:
            try:
                pa.ipc.open_stream(f).schema  # what datasets' arrow builder reads first; then the file format
            except Exception:  # noqa: BLE001
                f.seek(0)
                try:
                    pa.ipc.open_file(f).schema
                except Exception as e:  # noqa: BLE001
                    raise DataFileError(
                        f"{path} is not a readable Arrow file ({type(e).__name__}: {e}). Fix: write it again; a "
                        "folder written by `Dataset.save_to_disk` is loaded as a whole: give the folder, not the file.",
                        path=path,
                    ) from e


def _check_json_file(path: Path) -> None:
    """JSON Lines (one object per line), or one JSON document (an array of rows, or a mapping), as datasets reads."""
    problems, document, first_line_error, last_data_line = _scan_lines(path, parse_json=True)
    if document is None:
        problems.raise_if_any()
        if last_data_line == 0:
            raise DataFileError(
                f"{path} holds no data: only blank lines. Fix: write the data into it, or remove it.", path=path
            )
        return
    problems.raise_if_any()  # bytes that are not UTF-8
    try:
        _loads(document)
    except _NumberOutOfRange as e:
        index = document.find(e.literal.split("...")[0])
        line = document.count("\n", 0, index) + 1 if index >= 0 else None
        where = f", line {line}" if line else ""
        raise DataFileError(
            f"{path}{where}: the number {e.literal} is beyond float64's range, which datasets' JSON reader refuses. "
            f"Fix: {_RANGE_FIX}.", path=path, line=line,
        ) from None
    except json.JSONDecodeError as e:
        truncated = e.msg.startswith("Unterminated string") or e.pos >= len(document.rstrip())
        if first_line_error is not None and not truncated:
            problem = (
                f"line {first_line_error.lineno} is not a JSON object on its own ({_json_error(first_line_error)}), "
                f"so this is not JSON Lines; read as one JSON document it is not valid JSON: {_json_error(e)}"
            )
        elif e.pos >= len(document.rstrip()):  # at the end of the file: say where the text stops
            e.lineno = document.rstrip().count("\n") + 1
            problem = f"not valid JSON: {e.msg.removesuffix(' at')} at the end of line {e.lineno}, the last one"
        else:
            problem = f"not valid JSON: {_json_error(e)}"
        if truncated:
            problem += (
                " (the file ends before the JSON document does: it looks truncated, cut off while being written or "
                "downloaded)"
            )
            fix = "write or download the file again"
        else:
            fix = "correct the JSON there (a JSON Lines file holds one {\"column\": value, ...} object per line)"
        raise DataFileError(f"{path}: {problem}. Fix: {fix}.", path=path, line=e.lineno) from None


def _scan_lines(path: Path, parse_json: bool):
    """One pass over the lines of a text file: every byte UTF-8 and, with `parse_json`, every non-blank line one JSON
    object (JSON Lines). A file that starts with `[`, or whose first line is not JSON on its own, is one JSON
    document: its text is returned for a whole parse (datasets reads such a file whole too).

    Returns (problems, document text or None, the first line's JSON error or None, the last non-blank line).
    """
    problems = _Problems(path)
    document: list[str] | None = None
    first_line_error = None
    last_data_line = 0
    pending = None  # a JSON error that may be a truncated last line: decided by whether more data follows
    offset = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            start = offset
            offset += len(raw)
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            if pending is not None and raw.strip():  # the bad line was not the last one
                problems.add(*pending[1:])
                pending = None
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.add(
                    lineno,
                    f"byte {start + e.start} (column {e.start + 1} of line {lineno}) is not UTF-8: "
                    f"{raw[e.start:e.start + 4]!r} ({e.reason})",
                    _UTF8_FIX,
                )
                continue
            if document is not None:
                document.append(text)
                continue
            stripped = text.strip()
            if not stripped:
                continue
            if not parse_json:
                last_data_line = lineno
                continue
            if last_data_line == 0 and stripped.startswith("["):
                document = ["\n" * (lineno - 1), text]
                continue
            try:
                value = _loads(stripped)
            except json.JSONDecodeError as e:
                if last_data_line == 0:  # a pretty-printed JSON document, or a broken first line: parse it whole
                    first_line_error = e
                    first_line_error.lineno = lineno
                    document = ["\n" * (lineno - 1), text]
                    continue
                at_end = e.msg.startswith("Unterminated string") or e.pos >= len(stripped)
                message = f"not valid JSON: {_json_error(e, line=False)}"
                if at_end:
                    message = f"the line ends before its JSON object does ({message})"
                fix = "correct or remove the line (JSON Lines: one {\"column\": value, ...} object per line)"
                pending = (at_end, lineno, message, fix)
                last_data_line = lineno
                continue
            except _NumberOutOfRange as e:
                problems.add(
                    lineno, f"the number {e.literal} is beyond float64's range, which datasets' JSON reader refuses",
                    _RANGE_FIX,
                )
            else:
                if not isinstance(value, dict):
                    problems.add(
                        lineno,
                        f"{_JSON_TYPES.get(type(value), 'a JSON ' + type(value).__name__)} where a row (a JSON object) "
                        "was expected",
                        "JSON Lines holds one row per line, a {\"column\": value, ...} object",
                    )
            last_data_line = lineno
    if pending is not None:
        at_end, lineno, message, fix = pending
        if at_end:  # the last line stops before its object does
            message = (
                f"{message.replace('the line', 'the last line', 1)}: the file looks truncated, cut off while being "
                "written or downloaded"
            )
            fix = "write or download the file again, or delete the incomplete last line"
        problems.add(lineno, message, fix)
    return problems, None if document is None else "".join(document), first_line_error, last_data_line
