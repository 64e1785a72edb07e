"""Durable writes, one home each: a file that exists completely or not at all, fsynced folders, JSON for any column.

Every writer of the package uses these: the output_dir lock and the checkpoint marker (`runtime`), the chunk files of
`nca-trl generate`, the output of `nca-trl score`, the round files of `nca-trl iterate`, `run_info.json`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from pathlib import Path

__all__ = ["WEIGHT_SUFFIXES", "files_digest", "fsync_tree", "json_default", "json_digest", "parquet_table",
           "write_atomic"]

#: The files of a model folder that hold its weights (and their index)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Write `text` (UTF-8) or bytes to `path` through a temporary file in the same folder, fsynced, then renamed over
    `path`: a reader sees the old file or the new one, never half of one. The folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") if isinstance(text, bytes) else open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file below `folder` (before a marker says the folder is complete). Files that vanish meanwhile
    are skipped."""
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def json_default(value):
    """`json.dumps(default=...)` for carried columns JSON has no type for: timestamps and dates as ISO text, bytes as
    text, numpy / torch values as numbers or lists, anything else as its `str`."""
    if isinstance(value, (datetime.date, datetime.datetime, datetime.time)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def parquet_table(rows: list[dict], where: str):
    """`pyarrow.Table.from_pylist(rows)`, or a `DataError` naming the column whose values mix types across rows (an
    object in one row, a string in another), which one Parquet column cannot hold. `where` names the data."""
    import pyarrow as pa

    from .errors import DataError

    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        columns = dict.fromkeys(name for row in rows for name in row)
        column = next((name for name in columns if not _one_arrow_type([row.get(name) for row in rows])), None)
        raise DataError(
            f"{where}: column '{column}' mixes value types across rows ({e}), which one Parquet column cannot hold. "
            "Fix: write a .jsonl output instead, or give the column one type in every row."
        ) from e


def _one_arrow_type(values: list) -> bool:
    import pyarrow as pa

    try:
        pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    return True


def json_digest(values) -> str:
    """SHA-256 of values (rows, prompts) as JSON lines, keys sorted: what a rerun compares to know its inputs are the
    same (`nca-trl generate`'s prompts and carried columns, `nca-trl iterate`'s prompts)."""
    digest = hashlib.sha256()
    for value in values:
        digest.update(json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def files_digest(path: str | os.PathLike, sample: int = 1 << 20, names=None) -> str | None:
    """SHA-256 of a local file, or of a folder's files (top level; `names`: a predicate on the file name choosing
    them, e.g. a model's weights and config), read as each file's name, size and its first and last `sample` bytes:
    what a restart compares to know a model or a reward function's file is still the one the run began with, in well
    under a second for a 7B model (copying keeps it; training, `make-tiny-model --overwrite` or an edit changes it).
    None for what is not local (a Hub id)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and (names is None or names(p.name))) if path.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            digest.update(f.read(sample))
            if size > 2 * sample:
                f.seek(size - sample)
            digest.update(f.read(sample))
    return digest.hexdigest()
