"""Load the training data named by `nca-trl train`'s arguments and convert it to rated completions.

`dataset_name` is a Hugging Face Hub id, a data file (.json, .jsonl, .parquet, .csv, .arrow), a folder of data files
or a folder written by `datasets.save_to_disk`; `datasets` (a `trl.DatasetMixtureConfig`) mixes several.

Local data files are checked before `datasets` reads them (`nca_trl.data.datafiles`, `nca_trl.data.folders`): a
folder is loaded whole or refused, and a broken file is reported by name and line as a `DataFileError`. Whatever
`datasets` still refuses is re-raised as a `DataFileError` naming the file, with the library's error chained. Hub ids
are loaded as they are.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import datasets

from ..runtime.errors import SettingsError
from ..runtime.paths import check_data_folder
from .converters import convert_dataset, resolve_format
from .datafiles import FILE_BUILDERS, DataFileError, _file_type, check_data_file
from .folders import declares_configs, folder_data_files
from .json_columns import check_json_columns, check_json_strings
from .tokenize import with_row_index

__all__ = ["load_datasets", "load_raw", "load_split", "split_of"]

logger = logging.getLogger("nca_trl")


def load_raw(script_args, mixture):
    """The raw data as a `DatasetDict`."""
    if mixture.datasets:
        from trl import get_dataset

        checked = _checked_mixture(mixture)
        try:
            return get_dataset(checked)
        except ValueError as error:  # entries of other columns or styles, `fraction` on some entries only: TRL's or
            # datasets' words, as one line naming the mixture, not a traceback through them
            raise DataFileError(
                f"The `datasets:` mixture ({', '.join(str(e.path) for e in mixture.datasets)}) cannot be combined: "
                f"{error}. Give every entry the same columns and style (rated rows, or pairs; all standard text or "
                "all chat messages), and `fraction` on every entry or none.", path=None) from error
    name = script_args.dataset_name
    path = Path(name).expanduser()
    if path.is_file():
        builder = _checked_file(path, "dataset_name")
        return _load(f"the {builder} file {path}", path, builder, data_files=str(path))
    if path.is_dir():
        check_data_folder(path, "dataset_name")  # generate's / score's folder: its record would be read as rows
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = _load(f"the dataset folder {path} (datasets.save_to_disk)", path, None, from_disk=True)
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        if script_args.dataset_config is not None or declares_configs(path):
            # The folder's dataset card says which files make which configuration and split: datasets decides
            return _load(f"the folder {path}", path, str(path), name=script_args.dataset_config)
        splits, builder = _checked_folder_files(path)
        if builder is None:  # one type nca-trl does not check (e.g. .tsv): datasets reads the folder as before
            return _load(f"the folder {path}", path, str(path))
        return _load(f"the {builder} files of the folder {path}", path, builder, data_files=splits)
    return datasets.load_dataset(name, name=script_args.dataset_config)


def _checked_file(path: Path, setting: str) -> str:
    """The builder of a local data file (`a.jsonl.gz` is JSON Lines, as in a folder), the file checked
    (`check_data_file`); an unknown type is refused naming `setting`."""
    builder = FILE_BUILDERS.get(_file_type(path))
    if builder is None:
        raise SettingsError(f"Unknown data file type {path.suffix!r} for {path} (`{setting}`): use one of "
                            f"{sorted(FILE_BUILDERS)} (also compressed: .gz, .bz2, .xz), or a folder of such files.")
    check_data_file(path, builder)
    return builder


def _checked_folder_files(folder: Path) -> tuple[dict[str, list[str]], str | None]:
    """`folder_data_files(folder)`, every file checked where nca-trl knows the type (`builder` not None)."""
    splits, builder = folder_data_files(folder)
    for file in [f for found in splits.values() for f in found] if builder else []:
        check_data_file(file, builder)
    return splits, builder


def _checked_mixture(mixture):
    """The `datasets:` mixture with its local files checked as `dataset_name`'s are (`check_data_file`: file and line
    of a bad one), and an entry whose `path` is a local file read with its builder (`datasets.load_dataset` takes a
    file's builder and `data_files`, not a file as `path`: "Couldn't find any data file" of a file that exists)."""
    import dataclasses

    entries = []
    for i, entry in enumerate(mixture.datasets):
        path = Path(str(entry.path)).expanduser()
        files = entry.data_files
        if path.is_file() and files is None:
            entry = dataclasses.replace(entry, path=_checked_file(path, f"datasets[{i}].path"), data_files=str(path))
        elif path.is_dir() and files is None and entry.data_dir is None and not declares_configs(path):
            _checked_folder_files(path)
        elif entry.path in FILE_BUILDERS.values() and files is not None:  # `path: json` with local `data_files`
            for file in _listed_files(files):
                if file.is_file():
                    check_data_file(file, entry.path)
        entries.append(entry)
    return dataclasses.replace(mixture, datasets=entries)


def split_of(raw, split: str, field: str):
    """`raw[split]`, or a `SettingsError` naming the splits there are and the field that asked for it."""
    if split not in raw:
        raise SettingsError(f"Split {split!r} not found; the data has splits {list(raw)} (`{field}`).")
    return raw[split]


def load_split(args, split_field: str = "dataset_split", limit: int | None = None):
    """One split of `args.dataset_name` (`args.dataset_config`), as every command reads data, and its first `limit`
    rows: the rows of `nca-trl generate` (prompts) and `nca-trl score` (completions)."""
    from types import SimpleNamespace

    dataset = split_of(load_raw(args, SimpleNamespace(datasets=None)), getattr(args, split_field), split_field)
    check_json_strings(dataset, args.dataset_name)  # every column, carried to the output: text decoded as JSON
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return dataset


_CSV_TEXT = re.compile(r"^(prompt|chosen|rejected|instruction|A\d+)$")


def _check_csv_text(dataset, source: str | None) -> None:
    """A CSV file has no types: `datasets` reads a column whose every cell looks like a number as numbers, and text
    columns (answers "4", "12") would be refused row by row as "an int". Refused once, naming the column and why."""
    if not source or _file_type(source) != ".csv":
        return
    for name, feature in dataset.features.items():
        dtype = getattr(feature, "dtype", "string")
        if _CSV_TEXT.match(name) and dtype not in ("string", "large_string"):
            raise DataFileError(
                f"{source}: column '{name}' is text to train on, but every cell of it looks like a number (or is "
                f"empty), so `datasets` read it as {dtype}: a CSV file has no types. Fix: write the data as JSON "
                "Lines, where each text is a JSON string (\"4\").", path=source,
            )


def _trainer_rows(dataset, script_args, name: str):
    """Rated and preference rows go to the trainer as they are: it validates every row once, then converts. Raw
    layouts (UltraFeedback, columns) are converted here, their ratings parsed and checked as they are read."""
    kwargs = script_args.dataset_format_kwargs or {}
    fmt = resolve_format(dataset, script_args.dataset_format, name)
    if fmt in ("rated", "preference"):
        if kwargs:
            raise SettingsError(f"`dataset_format_kwargs` apply to the raw layouts only (ultrafeedback, columns), not to "
                                f"{fmt} rows: remove {sorted(kwargs)}.")
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

    source = None if mixture.datasets else script_args.dataset_name
    for raw_split in (train_raw, eval_raw):
        if raw_split is not None:
            check_json_columns(raw_split, source)
            _check_csv_text(raw_split, source)
    # Each row's position in the data as given, before a conversion drops rows or `eval_fraction` shuffles them into
    # a split: errors name the user's rows
    train = _trainer_rows(with_row_index(train_raw), script_args, "train")
    evaluation = _trainer_rows(with_row_index(eval_raw), script_args, "eval") if eval_raw is not None else None
    if script_args.eval_fraction is not None and len(train):  # none: the empty-data check names it
        held_out = math.ceil(script_args.eval_fraction * len(train))  # `train_test_split`'s count
        if held_out >= len(train):
            raise SettingsError(
                f"`eval_fraction: {script_args.eval_fraction}` of the {len(train)} training row(s) holds {held_out} "
                "out and leaves none to train on: give more rows, a smaller `eval_fraction`, or leave it unset "
                "(with `eval_strategy: no`)."
            )
        split = train.train_test_split(test_size=script_args.eval_fraction, seed=training_args.seed)
        train, evaluation = split["train"], split["test"]
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if evaluation is not None and script_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(script_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def _load(what: str, path: Path, builder: str | None, *, from_disk: bool = False, **kwargs):
    """`datasets.load_dataset(builder, **kwargs)` (or `load_from_disk`), any library error re-raised naming `what`.

    `datasets` keys its cache of local files on their path and modification time alone: a file rewritten with its
    time kept (`cp -p`, `rsync -t`, tar, a one-second clock) gave the cached old rows while the checks had read the
    new file. Where the data files' total size differs from what the cache recorded they are read again, said so."""
    try:
        if from_disk:
            return datasets.load_from_disk(str(path))
        loaded = datasets.load_dataset(builder, **kwargs)
        if _cache_is_stale(loaded, kwargs.get("data_files")):
            logger.warning("%s: the datasets cache held another version of it (the same modification time, another "
                           "size): read again.", what)
            loaded = datasets.load_dataset(builder, download_mode="force_redownload", verification_mode="no_checks",
                                           **kwargs)  # (the checks compare with the old version's split sizes)
        return loaded
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


def _cache_is_stale(loaded, data_files) -> bool:
    """Whether the total size of the local `data_files` (a path, a list, or split -> paths) differs from the one the
    loaded dataset's cache recorded (`info.download_size`)."""
    files = _listed_files(data_files)
    if not files or not all(f.is_file() for f in files):
        return False
    first = next(iter(loaded.values())) if isinstance(loaded, dict) else loaded
    recorded = getattr(getattr(first, "info", None), "download_size", None)
    return recorded is not None and recorded != sum(f.stat().st_size for f in files)


def _listed_files(data_files) -> list[Path]:
    """The paths of a `data_files` setting: a path, a list of them, or split -> a path or a list (None: none)."""
    listed = list(data_files.values()) if isinstance(data_files, dict) else [data_files]
    return [Path(f).expanduser() for item in listed if item
            for f in ([item] if isinstance(item, (str, Path)) else item)]
