"""A folder of data files read whole or refused: [`folder_data_files`] finds its files by split as
`datasets.load_dataset(folder)` does, and refuses what `datasets` would silently load only part of (files of several
types, files that match no split) as a [`DataFileError`] naming every file."""

from __future__ import annotations

from pathlib import Path

from .datafiles import _FOLDER_BUILDERS, FILE_BUILDERS, DataFileError, _file_type, _listing

__all__ = ["declares_configs", "folder_data_files"]


def declares_configs(folder: Path) -> bool:
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
