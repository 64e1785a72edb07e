"""Load the training data named by `nca-trl train`'s arguments and convert it to rated completions.

`dataset_name` is a Hugging Face Hub id, a data file (.json, .jsonl, .parquet, .csv, .arrow), a folder of data files
or a folder written by `datasets.save_to_disk`; `datasets` (a `trl.DatasetMixtureConfig`) mixes several.

Local data files are checked before `datasets` reads them, so that a broken file is reported by name (and line, where
the format has lines) as a [`DataFileError`] rather than a library traceback:

- a folder is loaded whole or refused: every data file in it has one type (JSON / JSON Lines, CSV, Parquet or Arrow),
  and when files are named for splits (`train.jsonl`, `test.jsonl`) every data file belongs to a split;
- an empty file is refused;
- JSON and JSON Lines: bytes that are not UTF-8 (with their line and byte offset), lines that are not JSON (a cut-off
  last line is reported as a truncated file), lines that are not objects, and numbers beyond float64 (`1e999`, which
  `datasets`' JSON reader refuses with a bare "Number too big to be stored in double");
- CSV: bytes that are not UTF-8; Parquet and Arrow: a footer / schema that cannot be read.

Each file is read once by the check, line by line (a JSON document that is not JSON Lines, e.g. one array of rows, is
parsed whole, as `datasets` does), before `datasets` reads it: cheap next to tokenization. Whatever `datasets` still
refuses is re-raised as a `DataFileError` naming the file, with the library's error chained. Hub ids are loaded as
they are.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
import math
from pathlib import Path

import datasets

from .converters import convert_dataset, resolve_format

__all__ = ["load_raw", "load_split", "split_of", "load_datasets", "FILE_BUILDERS", "DataFileError", "check_data_file", "folder_data_files"]

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

# Types of the files of a folder: FILE_BUILDERS and the other spellings `datasets` reads with the same builders
_FOLDER_BUILDERS = {**FILE_BUILDERS, ".ndjson": "json", ".geoparquet": "parquet", ".gpq": "parquet"}
_COMPRESSION = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_OTHER_COMPRESSION = (".zst", ".lz4", ".zip", ".tar")
_MAX_LISTED = 5


class DataFileError(ValueError):
    """A local data file (or folder of data files) that cannot be loaded. The message names the file, the line where
    the format has lines, what is wrong and how to fix it; `path` and `line` (or None) hold the first two."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.line = line


# ---------------------------------------------------------------------------------------------------------- loading
def load_raw(script_args, mixture):
    """The raw data as a `DatasetDict`."""
    if mixture.datasets:
        from trl import get_dataset

        return get_dataset(mixture)
    name = script_args.dataset_name
    path = Path(name).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"Unknown data file type {path.suffix!r} for {path}: use one of {sorted(FILE_BUILDERS)}.")
        check_data_file(path, builder)
        return _load(f"the {builder} file {path}", path, builder, data_files=str(path))
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = _load(f"the dataset folder {path} (datasets.save_to_disk)", path, None, from_disk=True)
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        if script_args.dataset_config is not None or _declares_configs(path):
            # The folder's dataset card says which files make which configuration and split: datasets decides
            return _load(f"the folder {path}", path, str(path), name=script_args.dataset_config)
        splits, builder = folder_data_files(path)
        if builder is None:  # one type nca-trl does not check (e.g. .tsv): datasets reads the folder as before
            return _load(f"the folder {path}", path, str(path))
        for files in splits.values():
            for file in files:
                check_data_file(file, builder)
        return _load(f"the {builder} files of the folder {path}", path, builder, data_files=splits)
    return datasets.load_dataset(name, name=script_args.dataset_config)


def split_of(raw, split: str, field: str):
    """`raw[split]`, or an error naming the splits there are and the field that asked for it."""
    if split not in raw:
        raise ValueError(f"Split {split!r} not found; the data has splits {list(raw)} (`{field}`).")
    return raw[split]


def load_split(args, split_field: str = "dataset_split", limit: int | None = None):
    """One split of `args.dataset_name` (`args.dataset_config`), as every command reads data, and its first `limit`
    rows: the rows of `nca-trl generate` (prompts) and `nca-trl score` (completions)."""
    from types import SimpleNamespace

    dataset = split_of(load_raw(args, SimpleNamespace(datasets=None)), getattr(args, split_field), split_field)
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return dataset


def _trainer_rows(dataset, script_args, name: str):
    """Rated and preference rows go to the trainer as they are: it validates every row once, then converts. Raw
    layouts (UltraFeedback, columns) are converted here, their ratings parsed and checked as they are read."""
    kwargs = script_args.dataset_format_kwargs or {}
    fmt = resolve_format(dataset, script_args.dataset_format, name)
    if fmt in ("rated", "preference"):
        if kwargs:
            raise TypeError(f"`dataset_format_kwargs` apply to the raw layouts only, not to {fmt} rows: {sorted(kwargs)}")
        return dataset
    return convert_dataset(dataset, fmt, dataset_name=name, **kwargs)


def load_datasets(script_args, mixture, training_args):
    """(train, eval or None), following the script arguments: rated or preference rows as loaded (the trainer
    validates and converts them), raw layouts converted to rated rows."""
    raw = load_raw(script_args, mixture)
    if mixture.datasets:
        train_raw = split_of(raw, "train", "datasets")
    else:
        train_raw = split_of(raw, script_args.dataset_train_split, "dataset_train_split")
    eval_raw = None
    test_split = "test" if mixture.datasets and mixture.test_split_size else script_args.dataset_test_split
    if test_split is not None:
        eval_raw = split_of(raw, test_split, "dataset_test_split")

    train = _trainer_rows(train_raw, script_args, "train")
    evaluation = _trainer_rows(eval_raw, script_args, "eval") if eval_raw is not None else None
    if script_args.eval_fraction is not None:
        split = train.train_test_split(test_size=script_args.eval_fraction, seed=training_args.seed)
        train, evaluation = split["train"], split["test"]
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if evaluation is not None and script_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(script_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def _load(what: str, path: Path, builder: str | None, *, from_disk: bool = False, **kwargs):
    """`datasets.load_dataset(builder, **kwargs)` (or `load_from_disk`), any library error re-raised naming `what`."""
    try:
        if from_disk:
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(builder, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the file named and the original chained
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        detail = f"{type(root).__name__}: {root}" if str(root) else type(root).__name__
        if root is not e:
            detail = f"{type(e).__name__} ({e}), caused by {detail}"
        raise DataFileError(f"Could not load {what}: {detail}", path=path) from e


# ---------------------------------------------------------------------------------------------------------- folders
def _file_type(file: str | Path) -> str:
    """The data type of a file by its name, compression suffixes aside: `a.jsonl.gz` -> `.jsonl`."""
    suffixes = [s.lower() for s in Path(file).suffixes]
    while suffixes and suffixes[-1] in (*_COMPRESSION, *_OTHER_COMPRESSION):
        suffixes.pop()
    return suffixes[-1] if suffixes else "(no extension)"


def _declares_configs(folder: Path) -> bool:
    """Whether the folder's README.md (YAML header) or .huggingface.yaml declares `configs` with their data files."""
    import yaml

    for name in ("README.md", ".huggingface.yaml"):
        card = folder / name
        if not card.is_file():
            continue
        text = card.read_text(encoding="utf-8", errors="replace")
        if name == "README.md":
            if not text.startswith("---"):
                continue
            text = text[3:].split("\n---", 1)[0]
        try:
            header = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        if isinstance(header, dict) and header.get("configs"):
            return True
    return False


def folder_data_files(folder: str | Path) -> tuple[dict[str, list[str]], str | None]:
    """The data files of a folder by split, as `datasets.load_dataset(folder)` finds them, and their builder.

    Raises a `DataFileError` where `datasets` would silently load only part of the folder: data files of several
    types (it keeps the most common type only), or files that belong to no split (once any file is named for a split,
    e.g. `train.jsonl`, it keeps only the files named for one). The builder is None for a folder of one type that
    nca-trl does not check itself (e.g. `.tsv`).
    """
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        from datasets.load import _ALL_ALLOWED_EXTENSIONS as allowed
    except ImportError:  # pragma: no cover - a datasets version without it: the types nca-trl knows
        allowed = sorted(_FOLDER_BUILDERS)

    folder = Path(folder).expanduser().resolve()
    try:
        every = DataFilesDict.from_patterns({"all": ["**"]}, base_path=str(folder), allowed_extensions=allowed)["all"]
        patterns = get_data_patterns(str(folder))
    except EmptyDatasetError:
        every = []
    if not every:
        raise DataFileError(
            f"The folder {folder} holds no data file (.json, .jsonl, .csv, .parquet, .arrow; hidden files and folders "
            "are skipped). Point `dataset_name` at the data file or at a folder that holds it.",
            path=folder,
        )
    splits = DataFilesDict.from_patterns(patterns, base_path=str(folder), allowed_extensions=allowed)
    splits = {str(split): list(files) for split, files in splits.items()}

    def rel(file):
        return str(Path(file).relative_to(folder)) if Path(file).is_relative_to(folder) else str(file)

    by_type: dict[str, list[str]] = {}
    for file in every:
        kind = _FOLDER_BUILDERS.get(_file_type(file), _file_type(file))
        by_type.setdefault(kind, []).append(rel(file))
    if len(by_type) > 1:
        kinds = "; ".join(
            f"{kind}: {len(files)} file{'s' if len(files) > 1 else ''} ({_listing(files)})"
            for kind, files in sorted(by_type.items(), key=lambda item: -len(item[1]))
        )
        raise DataFileError(
            f"The folder {folder} holds data files of {len(by_type)} types ({kinds}). datasets would load only the "
            "most common type and skip the others without a word, so nca-trl refuses the folder. Fix: keep one type "
            "per folder (move or convert the others), point `dataset_name` at one file, or list each file as an entry "
            "of a `datasets:` mixture in the recipe (`- path: json` / `data_files: ...`, `- path: csv` / ...).",
            path=folder,
        )
    in_splits = {file for files in splits.values() for file in files}
    left_out = [rel(file) for file in every if file not in in_splits]
    if left_out:
        named = ", ".join(f"{split}: {_listing([rel(f) for f in files])}" for split, files in splits.items())
        raise DataFileError(
            f"The folder {folder} has files named for splits ({named}), and datasets would skip the "
            f"{len(left_out)} data file{'s' if len(left_out) > 1 else ''} that match no split: {_listing(left_out)}. "
            "Fix: rename them for their split (e.g. train-2.jsonl, test-2.jsonl), or move them out of the folder.",
            path=folder,
        )
    (kind,) = by_type
    return splits, (kind if kind in FILE_BUILDERS.values() else None)


def _listing(items: list, limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------------------- files
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
