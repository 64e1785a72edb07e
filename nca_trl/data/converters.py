# Copyright 2025 The nca-trl authors. Licensed under the Apache License, Version 2.0.
"""Any accepted or raw layout to rated completions `{"prompt", "completions", "rewards"}`, a whole dataset at a time.

[`resolve_format`] reads the layout from row 0 (or checks the one asked for); [`convert_dataset`] converts with the
row converter of that layout (`to_rated` for rated and preference rows, [`ultrafeedback_to_rated`] in
`nca_trl.data.ultrafeedback`, [`columns_to_rated`] in `nca_trl.data.columns`) and drops rows left with fewer than 2
completions, with one warning that counts them.
"""

from __future__ import annotations

import logging

import datasets

from ..runtime.errors import ROW_INDEX
from .columns import columns_to_rated
from .formats import (
    _MAX_REPORTED_ROWS,
    DATASET_FORMATS,
    RATED,
    DataValidationError,
    _detect_raw_format,
    detect_format,
)
from .ultrafeedback import ultrafeedback_to_rated
from .validation import to_rated

logger = logging.getLogger("nca_trl")

__all__ = ["convert_dataset", "resolve_format"]


def _standard_features(with_dropped: bool, row_index: bool = False):
    list_of = getattr(datasets, "List", None) or datasets.Sequence  # `List` since datasets 4
    features = {
        "prompt": datasets.Value("string"),
        "completions": list_of(datasets.Value("string")),
        "rewards": list_of(datasets.Value("float64")),
    }
    if with_dropped:
        features["num_dropped_completions"] = datasets.Value("int64")
    features["_nca_num_completions"] = datasets.Value("int64")
    if row_index:
        features[ROW_INDEX] = datasets.Value("int64")
    return datasets.Features(features)


def resolve_format(dataset, dataset_format: str = "auto", dataset_name: str = "train") -> str:
    """The layout of `dataset` (`"rated"`, `"preference"`, `"ultrafeedback"` or `"columns"`): detected from row 0
    for `"auto"`, else `dataset_format` once checked (rated / preference: row 0 is in it; ultrafeedback / columns: the
    data has the columns it needs). Rows are not validated here. Raises a `DataValidationError` for an empty dataset
    or data in another layout than the one asked for."""
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"dataset_format={dataset_format!r} is not one of {list(DATASET_FORMATS)}")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"a datasets.Dataset or a list of dicts is needed, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise DataValidationError("the dataset has no rows", "pass a dataset with at least one row",
                                  dataset_name=dataset_name)
    from ..config import setting  # `dataset_format: auto` (or `--dataset_format auto`) on the command line

    first = dataset.with_format(None)[0]
    # Only `auto` reads the layout from row 0: an explicit one is checked by the columns it needs (row 0 of an
    # UltraFeedback file may have no completion: the converter drops it with the others, counted)
    fmt = _detect_raw_format(first, dataset_name) if dataset_format == "auto" else dataset_format
    if fmt in ("rated", "preference"):
        row_fmt = detect_format(first, 0, dataset_name)
        if (fmt == "rated") != (row_fmt == RATED):
            raise DataValidationError(
                f"{setting('dataset_format', fmt)} was asked for but row 0 is in the '{row_fmt}' format",
                f"pass {setting('dataset_format', 'auto')} or the format the data is in", row=0, field="", dataset_name=dataset_name,
            )
    columns = [c for c in dataset.column_names if c != ROW_INDEX]
    needed = {"ultrafeedback": ["instruction", "completions"], "columns": ["A0", "A1"]}.get(fmt, [])
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataValidationError(
            f"{setting('dataset_format', fmt)} was asked for but the data has no column(s) {missing} (its columns: {columns})",
            f"pass {setting('dataset_format', 'auto')} or the format the data is in", field=missing[0], dataset_name=dataset_name,
        )
    return fmt


def convert_dataset(
    dataset,
    dataset_format: str = "auto",
    dataset_name: str = "train",
    **converter_kwargs,
) -> datasets.Dataset:
    r"""
    Converts a whole dataset to the rated format `{"prompt", "completions", "rewards"}`.

    Rows left with fewer than 2 completions (UltraFeedback rows whose ratings were unusable, column-layout rows with
    absent completions) are dropped with one logged warning that states how many rows and completions were dropped.
    The result is not validated: pass it to [`validate_dataset`] (the trainers do).

    Args:
        dataset (`datasets.Dataset` or `list[dict]`):
            The dataset (a list is turned into a `datasets.Dataset`).
        dataset_format (`str`, *optional*, defaults to `"auto"`):
            One of `"auto"`, `"rated"`, `"preference"` (explicit or implicit prompt), `"ultrafeedback"` (raw
            openbmb/UltraFeedback, [`ultrafeedback_to_rated`]), `"columns"` (`A0..` + scores, [`columns_to_rated`]).
            `"auto"` reads row 0.
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Dataset name, for messages.
        **converter_kwargs:
            Passed to the converter, e.g. `score_field="helpfulness", unusable="error"` for UltraFeedback.

    Returns:
        `datasets.Dataset` with exactly the columns `prompt`, `completions` and `rewards`.

    Examples:

    ```python
    >>> from datasets import load_dataset
    >>> raw = load_dataset("openbmb/UltraFeedback", split="train")
    >>> ds = convert_dataset(raw, "ultrafeedback", score_field="overall_score")
    >>> ds.column_names
    ['prompt', 'completions', 'rewards']
    ```
    """
    if isinstance(dataset, (list, tuple)):
        dataset = datasets.Dataset.from_list(list(dataset))
    fmt = resolve_format(dataset, dataset_format, dataset_name)
    first = dataset.with_format(None)[0]
    if fmt in ("rated", "preference"):
        converter = to_rated
    elif fmt == "ultrafeedback":
        converter = ultrafeedback_to_rated
        # Fail on bad keyword arguments now rather than inside `map`.
        ultrafeedback_to_rated(first, 0, dataset_name=dataset_name, **converter_kwargs)
    else:
        converter = columns_to_rated
    if converter_kwargs and converter is not ultrafeedback_to_rated:
        raise TypeError(f"{converter.__name__} takes no extra arguments, got {sorted(converter_kwargs)}")

    carry = ROW_INDEX in dataset.column_names  # each row's position in the data as given (`with_row_index`)

    def convert(example, index):
        row = example.get(ROW_INDEX, index)
        out = converter(example, row, dataset_name=dataset_name, **converter_kwargs)
        out["_nca_num_completions"] = len(out["completions"])
        if carry:
            out[ROW_INDEX] = row
        return out

    features = None
    if fmt == "ultrafeedback":
        features = _standard_features(with_dropped=True, row_index=carry)
    elif fmt == "columns" and isinstance(first.get("A0"), str):
        features = _standard_features(with_dropped=False, row_index=carry)
    converted = dataset.with_format(None).map(
        convert,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=features,
        desc=f"Converting {dataset_name} dataset ({fmt}) to rated completions",
    )

    sizes = converted["_nca_num_completions"]
    if "num_dropped_completions" in converted.column_names:
        dropped_in_rows = converted["num_dropped_completions"]
    else:
        dropped_in_rows = [0] * len(sizes)
    short_rows = [i for i, k in enumerate(sizes) if k < 2]
    names = converted[ROW_INDEX] if carry else range(len(sizes))
    total_dropped = sum(dropped_in_rows)
    if short_rows or total_dropped:
        short_set = set(short_rows)
        kept_in_short = sum(sizes[i] for i in short_rows)
        logger.warning(
            "%s dataset (%s): dropped %d of %d rows (left with fewer than 2 usable completions) and %d completions "
            "in all (%d with an unusable rating or empty text, plus %d usable ones inside the dropped rows); "
            "%d rows remain. First dropped rows: %s; first kept rows that lost completions: %s",
            dataset_name,
            fmt,
            len(short_rows),
            len(sizes),
            total_dropped + kept_in_short,
            total_dropped,
            kept_in_short,
            len(sizes) - len(short_rows),
            [names[i] for i in short_rows[:_MAX_REPORTED_ROWS]],
            [names[i] for i, n in enumerate(dropped_in_rows) if n and i not in short_set][:_MAX_REPORTED_ROWS],
        )
        if short_rows:
            converted = converted.select([i for i in range(len(sizes)) if i not in short_set])
    helper_columns = [c for c in ("_nca_num_completions", "num_dropped_completions") if c in converted.column_names]
    return converted.remove_columns(helper_columns)
