"""Durable writes, one home each: a file that exists completely or not at all, fsynced folders, JSON for any column.

Every writer of the package uses these: the output_dir lock and the checkpoint marker (`runtime`), the chunk files of
`nca-trl generate`, the output of `nca-trl score`, the round files of `nca-trl iterate`, `run_info.json`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

__all__ = ["check_local_path", "fsync_tree", "json_default", "write_atomic"]


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


_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow", ".py", ".yaml", ".yml")


def check_local_path(value: str | None, field: str, what: str = "folder") -> None:
    """Raise a `ValueError` "no such folder: PATH" when `value` (of setting `field`) reads as a local path that does not
    exist, instead of the Hub's "Repo id must be in the form ..." after a download attempt. A local path is absolute,
    starts with `.` or `~`, has more than one `/`, ends with a data-file suffix, or its first folder exists here
    (`outputs/model` beside an `outputs/` folder); anything else may be a Hub id (`org/name`) and is left to the Hub."""
    if not value:
        return
    path = Path(os.path.expanduser(str(value)))
    if path.exists():
        return
    text = str(value)
    local = (text.startswith(("/", ".", "~")) or text.count("/") > 1 or path.suffix.lower() in _DATA_SUFFIXES
             or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()))
    if local:
        raise ValueError(f"no such {what}: {value} (`{field}`). Check the path, or give a Hugging Face Hub id "
                         "(`org/name`).")

