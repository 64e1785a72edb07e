"""Load the training data named by `nca-trl train`'s arguments and convert it to rated completions.

`dataset_name` is a Hugging Face Hub id, a data file (.json, .jsonl, .parquet, .csv, .arrow), a folder of data files
or a folder written by `datasets.save_to_disk`; `datasets` (a `trl.DatasetMixtureConfig`) mixes several.
"""

from __future__ import annotations

from pathlib import Path

import datasets

from . import convert_dataset

__all__ = ["load_raw", "load_datasets", "FILE_BUILDERS"]

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


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
        return datasets.load_dataset(builder, data_files=str(path))
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        return datasets.load_dataset(str(path), name=script_args.dataset_config)
    return datasets.load_dataset(name, name=script_args.dataset_config)


def load_datasets(script_args, mixture, training_args):
    """(train, eval or None) in the rated format, following the script arguments."""
    raw = load_raw(script_args, mixture)
    train_split = "train" if mixture.datasets else script_args.dataset_train_split
    if train_split not in raw:
        raise ValueError(f"Split {train_split!r} not found; the data has splits {list(raw)} (`dataset_train_split`).")
    eval_raw = None
    test_split = "test" if mixture.datasets and mixture.test_split_size else script_args.dataset_test_split
    if test_split is not None:
        if test_split not in raw:
            raise ValueError(f"Split {test_split!r} not found; the data has splits {list(raw)} (`dataset_test_split`).")
        eval_raw = raw[test_split]

    kwargs = script_args.dataset_format_kwargs or {}
    train = convert_dataset(raw[train_split], script_args.dataset_format, dataset_name="train", **kwargs)
    evaluation = None
    if eval_raw is not None:
        evaluation = convert_dataset(eval_raw, script_args.dataset_format, dataset_name="eval", **kwargs)
    if script_args.eval_fraction is not None:
        split = train.train_test_split(test_size=script_args.eval_fraction, seed=training_args.seed)
        train, evaluation = split["train"], split["test"]
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if evaluation is not None and script_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(script_args.max_eval_samples, len(evaluation))))
    return train, evaluation
