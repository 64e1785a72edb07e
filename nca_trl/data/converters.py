# Copyright 2025 The nca-trl authors. Licensed under the Apache License, Version 2.0.
"""Converters from raw layouts to rated completions `{"prompt", "completions", "rewards"}`.

[`ultrafeedback_to_rated`] (openbmb/UltraFeedback's raw rows) and [`columns_to_rated`] (`prompt` + `A0..A{K-1}` +
scores, the paper's released reward data) convert one row and can be passed to `datasets.map`; [`convert_dataset`]
converts a whole dataset, any accepted or raw layout, and drops rows left with fewer than 2 completions.

Scores follow the reward rule of `nca_trl.data.rewards` (finite numbers; strings, numeric ones included, refused),
checked by the same function, with one deliberate exception: UltraFeedback ships its ratings as text (`"4"`, `"N/A"`),
so [`ultrafeedback_to_rated`] parses them and leaves out (or refuses) the ones that are not numbers.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any

import datasets

from .formats import (
    _MAX_REPORTED_ROWS,
    DATASET_FORMATS,
    RATED,
    DataValidationError,
    _as_list,
    _detect_raw_format,
    _is_bool,
    _kind,
    _looks_like_ultrafeedback,
    _mixed_style_error,
    _short,
    _style,
    detect_format,
)
from .rewards import check_rewards
from .validation import to_rated


logger = logging.getLogger("nca_trl")

__all__ = ["ULTRAFEEDBACK_ASPECTS", "ULTRAFEEDBACK_SCORE_FIELDS", "columns_to_rated", "convert_dataset",
           "resolve_format", "ultrafeedback_to_rated"]

#: UltraFeedback's four annotation aspects (their `Rating` is a string such as "4" or "N/A").
ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
ULTRAFEEDBACK_SCORE_FIELDS = ("overall_score", "fine-grained_score", *ULTRAFEEDBACK_ASPECTS, "mean_aspects")

_A_COLUMN = re.compile(r"^A(\d+)$")


# --------------------------------------------------------------------------------------------------- UltraFeedback


def _parse_rating(value: Any) -> tuple[float | None, str]:
    """`(score, "")` for a usable rating (a finite number or numeric string), else `(None, why)`."""
    if value is None:
        return None, "is missing (None)"
    if _is_bool(value):
        return None, f"is the boolean {value!r}"
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None, "is an empty string"
        try:
            number = float(text)
        except ValueError:
            return None, f"is {_short(value)}, not a number"
    elif isinstance(value, numbers.Real):
        number = float(value)
    else:
        return None, f"is {_kind(value)}, not a number"
    if not math.isfinite(number):
        return None, f"is {number}"
    return number, ""


def _ultrafeedback_score(completion: Mapping, score_field: str) -> tuple[float | None, str, str]:
    """`(score or None, field path inside the completion, why unusable)`."""
    if score_field in ("overall_score", "fine-grained_score"):
        score, why = _parse_rating(completion.get(score_field))
        return score, score_field, why
    annotations = completion.get("annotations")
    if not isinstance(annotations, Mapping):
        return None, "annotations", f"is {_kind(annotations)}, expected a dict of aspects"
    if score_field == "mean_aspects":
        scores = []
        for aspect in ULTRAFEEDBACK_ASPECTS:
            entry = annotations.get(aspect)
            score, _ = _parse_rating(entry.get("Rating") if isinstance(entry, Mapping) else None)
            if score is not None:
                scores.append(score)
        if not scores:
            return None, "annotations", f"has no usable Rating in any of the aspects {list(ULTRAFEEDBACK_ASPECTS)}"
        return sum(scores) / len(scores), "annotations", ""
    entry = annotations.get(score_field)
    path = f"annotations.{score_field}.Rating"
    if not isinstance(entry, Mapping):
        return None, path, "is missing"
    score, why = _parse_rating(entry.get("Rating"))
    return score, path, why


def ultrafeedback_to_rated(
    example: dict,
    index: int | None = None,
    score_field: str = "overall_score",
    unusable: str = "drop",
    dataset_name: str = "train",
) -> dict:
    r"""
    Converts a row of UltraFeedback's raw layout (openbmb/UltraFeedback) to the rated format.

    The raw row is `{"source", "instruction", "models", "completions": [{"model", "response", "overall_score",
    "fine-grained_score", "critique", "custom_system_prompt", "principle", "annotations": {aspect: {"Rating",
    "Rationale", ...}}}]}`, where the aspect ratings are *strings* such as `"4"` or `"N/A"`.

    A completion is unusable when its response is empty or its score is `"N/A"`, `None`, `""`, NaN, missing or not a
    number. With `unusable="drop"` it is left out and counted in `"num_dropped_completions"`; with
    `unusable="error"` a [`DataValidationError`] names the row, the completion and the field. A row may come out with
    fewer than 2 completions: [`convert_dataset`] filters those (with a counted warning).

    Args:
        example (`dict`):
            One raw UltraFeedback row.
        index (`int` or `None`, *optional*):
            Its index, for error messages (pass `with_indices=True` to `datasets.map`).
        score_field (`str`, *optional*, defaults to `"overall_score"`):
            Which score becomes the reward:
            - `"overall_score"`: the critique's overall 1-10 score (the paper's choice);
            - `"fine-grained_score"`: the mean of the aspect ratings as shipped;
            - `"helpfulness"`, `"honesty"`, `"instruction_following"`, `"truthfulness"`: that aspect's `Rating` (1-5);
            - `"mean_aspects"`: the mean of the usable aspect ratings (an `"N/A"` aspect is left out of the mean).
        unusable (`str`, *optional*, defaults to `"drop"`):
            `"drop"` or `"error"`, see above.
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Dataset name, for error messages.

    Returns:
        `dict`: `{"prompt": instruction, "completions": [responses], "rewards": [floats], "num_dropped_completions": n}`.

    Examples:

    ```python
    >>> from datasets import load_dataset
    >>> ds = load_dataset("openbmb/UltraFeedback", split="train")
    >>> ds = ds.map(ultrafeedback_to_rated, with_indices=True, fn_kwargs={"score_field": "overall_score"},
    ...             remove_columns=ds.column_names)
    >>> # or, with the < 2 filtering and the warning: convert_dataset(ds, "ultrafeedback")
    ```
    """
    if score_field not in ULTRAFEEDBACK_SCORE_FIELDS:
        raise ValueError(f"score_field={score_field!r} is not one of {list(ULTRAFEEDBACK_SCORE_FIELDS)}")
    if unusable not in ("drop", "error"):
        raise ValueError(f"unusable={unusable!r} is not one of ['drop', 'error']")
    instruction = example.get("instruction")
    if not isinstance(instruction, str) or instruction == "":
        raise DataValidationError(
            f"the instruction is {_kind(instruction) if instruction != '' else 'an empty string'}, expected "
            f"non-empty text",
            "drop rows without an instruction before converting",
            row=index, field="instruction", dataset_name=dataset_name,
        )
    raw = _as_list(example.get("completions"))
    if not isinstance(raw, (list, tuple)):
        raise DataValidationError(
            f"'completions' is {_kind(raw)}, expected UltraFeedback's list of completion dicts",
            "pass rows of openbmb/UltraFeedback's raw layout",
            row=index, field="completions", dataset_name=dataset_name,
        )
    completions, rewards, dropped = [], [], 0
    for pos, completion in enumerate(raw):
        if not isinstance(completion, Mapping):
            raise DataValidationError(
                f"completion {pos} is {_kind(completion)}, expected a dict with 'response' and scores",
                "pass rows of openbmb/UltraFeedback's raw layout",
                row=index, field=f"completions[{pos}]", dataset_name=dataset_name,
            )
        response = completion.get("response")
        if not isinstance(response, str) or response == "":
            score, path = None, "response"
            why = "is an empty string" if response == "" else f"is {_kind(response)}"
            problem = f"the response of completion {pos} {why}"
        else:
            score, path, why = _ultrafeedback_score(completion, score_field)
            problem = f"the {score_field} score of completion {pos} {why}"
        if score is None:
            if unusable == "error":
                raise DataValidationError(
                    f"{problem}; it cannot be used as a reward",
                    "pass unusable='drop' to leave such completions out (they are counted), choose another "
                    "score_field, or clean the data",
                    row=index, field=f"completions[{pos}].{path}", dataset_name=dataset_name,
                )
            dropped += 1
            continue
        completions.append(response)
        rewards.append(score)
    return {
        "prompt": instruction,
        "completions": completions,
        "rewards": rewards,
        "num_dropped_completions": dropped,
    }


# --------------------------------------------------------------------------------------------------- column layout


def _split_conversation(messages) -> tuple[list, list]:
    """`(context, completion)`: the completion is the trailing run of assistant messages."""
    messages = list(messages)
    split = len(messages)
    while split > 0 and isinstance(messages[split - 1], Mapping) and messages[split - 1].get("role") == "assistant":
        split -= 1
    return messages[:split], messages[split:]


def _score_column(example: Mapping, i: int) -> str | None:
    for name in (f"A{i}_score", f"score_A{i}"):
        if name in example:
            return name
    return None


def columns_to_rated(example: dict, index: int | None = None, dataset_name: str = "train") -> dict:
    r"""
    Converts a row of the column layout of the paper's released reward data to the rated format.

    The row holds a `prompt`, completion columns `A0 .. A{K-1}` (K read from the columns, contiguous from 0) and one
    score column per completion, named `A{i}_score` or `score_A{i}` (the authors' spelling). A completion cell is a
    string, or a conversation such as `[{"role": "user", "content": prompt}, {"role": "assistant", "content": resp}]`:
    then the completion is its trailing assistant message(s) and the messages before them are the prompt (so the
    `prompt` column may be absent). A completion whose cell *and* score are both `None` is absent from this row
    (ragged K in an Arrow table); any other missing or non-numeric score is an error.

    Args:
        example (`dict`):
            One row.
        index (`int` or `None`, *optional*):
            Its index, for error messages (pass `with_indices=True` to `datasets.map`).
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Dataset name, for error messages.

    Returns:
        `dict`: `{"prompt", "completions", "rewards"}` (rewards as `float`).

    Raises:
        `DataValidationError`: naming the row and the column.

    Examples:

    ```python
    >>> columns_to_rated({"prompt": "2+2=", "A0": "4", "A1": "5", "A0_score": 9, "A1_score": 2})
    {'prompt': '2+2=', 'completions': ['4', '5'], 'rewards': [9.0, 2.0]}
    >>> columns_to_rated({
    ...     "A0": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
    ...     "A1": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "5"}],
    ...     "score_A0": 9.0, "score_A1": 2.0})
    {'prompt': [{'role': 'user', 'content': '2+2='}], 'completions': [[{'role': 'assistant', 'content': '4'}], [{'role': 'assistant', 'content': '5'}]], 'rewards': [9.0, 2.0]}
    ```
    """
    numbers_present = sorted(int(m.group(1)) for k in example if isinstance(k, str) and (m := _A_COLUMN.match(k)))
    k = 0
    while k in numbers_present:
        k += 1
    if k == 0:
        raise DataValidationError(
            "no completion column 'A0' (the column layout has completion columns A0, A1, ... and score columns)",
            "name the completion columns A0..A{K-1}, or pick the converter that matches the data",
            row=index, field="A0", dataset_name=dataset_name,
        )
    if numbers_present[-1] >= k:
        raise DataValidationError(
            f"completion columns are not contiguous: 'A{k}' is missing but 'A{numbers_present[-1]}' exists",
            "name the completion columns A0..A{K-1} without gaps",
            row=index, field=f"A{k}", dataset_name=dataset_name,
        )

    cells, scores, score_names, names = [], [], [], []
    for i in range(k):
        cell = _as_list(example[f"A{i}"])
        score_name = _score_column(example, i)
        if score_name is None:
            raise DataValidationError(
                f"no score column for completion A{i} (looked for 'A{i}_score' and 'score_A{i}')",
                f"add a score column 'A{i}_score' (or 'score_A{i}') with one number per completion",
                row=index, field=f"A{i}_score", dataset_name=dataset_name,
            )
        score = example[score_name]
        if cell is None and score is None:
            continue  # this row has fewer completions than the table has columns
        if cell is None:
            raise DataValidationError(
                f"completion A{i} is None but its score {score_name} is {_short(score)}",
                f"give A{i} its text, or set both A{i} and {score_name} to None to leave it out",
                row=index, field=f"A{i}", dataset_name=dataset_name,
            )
        cells.append(cell)
        scores.append(score)
        score_names.append(score_name)
        names.append(f"A{i}")
    check_rewards(scores, index, dataset_name, fields=score_names,
                  names=[f"the score of completion {name}" for name in names])
    rewards = [float(score) for score in scores]

    styles = {_style(cell) for cell in cells}
    if None in styles:
        bad = next(name for name, cell in zip(names, cells) if _style(cell) is None)
        cell = cells[names.index(bad)]
        raise DataValidationError(
            f"completion {bad} is {_kind(cell)}, expected a string or a list of messages",
            "store each completion as text or as a conversation", row=index, field=bad, dataset_name=dataset_name,
        )
    if len(styles) > 1:
        bad = next(name for name, cell in zip(names, cells) if _style(cell) != _style(cells[0]))
        raise _mixed_style_error(names[0], _style(cells[0]), bad, _style(cells[names.index(bad)]), index,
                                 dataset_name, bad)

    prompt = example.get("prompt")
    if styles == {"conversational"}:
        completions, context = [], None
        for name, cell in zip(names, cells):
            own_context, completion = _split_conversation(cell)
            if not completion:
                raise DataValidationError(
                    f"conversation {name} does not end with an assistant message",
                    "end every completion conversation with the assistant's reply", row=index, field=name,
                    dataset_name=dataset_name,
                )
            if own_context:
                if context is None:
                    context = own_context
                elif own_context != context:
                    raise DataValidationError(
                        f"conversation {name} starts with different messages than {names[0]}: the completions of a "
                        f"row must answer the same prompt",
                        "split rows whose conversations differ before the reply", row=index, field=name,
                        dataset_name=dataset_name,
                    )
            completions.append(completion)
        if context:
            prompt = context
        elif isinstance(prompt, str) and prompt:
            prompt = [{"role": "user", "content": prompt}]
        elif not prompt:
            raise DataValidationError(
                "no prompt: no 'prompt' column and the conversations hold only assistant messages",
                "add a 'prompt' column or include the user turn in the conversations", row=index, field="prompt",
                dataset_name=dataset_name,
            )
    else:
        completions = cells
        if prompt is None:
            raise DataValidationError(
                "no 'prompt' column (needed when the completions are plain text)",
                "add a 'prompt' column holding the instruction", row=index, field="prompt",
                dataset_name=dataset_name,
            )
    return {"prompt": prompt, "completions": completions, "rewards": rewards}


def _standard_features(with_dropped: bool):
    list_of = getattr(datasets, "List", None) or datasets.Sequence  # `List` since datasets 4
    features = {
        "prompt": datasets.Value("string"),
        "completions": list_of(datasets.Value("string")),
        "rewards": list_of(datasets.Value("float64")),
    }
    if with_dropped:
        features["num_dropped_completions"] = datasets.Value("int64")
    features["_nca_num_completions"] = datasets.Value("int64")
    return datasets.Features(features)


def resolve_format(dataset, dataset_format: str = "auto", dataset_name: str = "train") -> str:
    """The layout of `dataset` (`"rated"`, `"preference"`, `"ultrafeedback"` or `"columns"`), read from row 0: the
    detected one for `"auto"`, else `dataset_format` once row 0 is checked to be in it. Rows are not validated here.
    Raises a `DataValidationError` for an empty dataset or a row 0 in another layout than the one asked for."""
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"dataset_format={dataset_format!r} is not one of {list(DATASET_FORMATS)}")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"a datasets.Dataset or a list of dicts is needed, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise DataValidationError("the dataset has no rows", "pass a dataset with at least one row",
                                  dataset_name=dataset_name)
    first = dataset.with_format(None)[0]
    detected = _detect_raw_format(first, dataset_name)
    fmt = detected if dataset_format == "auto" else dataset_format
    if fmt in ("rated", "preference"):
        row_fmt = detect_format(first, 0, dataset_name)
        if (fmt == "rated") != (row_fmt == RATED):
            raise DataValidationError(
                f"dataset_format={fmt!r} was asked for but row 0 is in the '{row_fmt}' format",
                "pass dataset_format='auto' or the format the data is in", row=0, field="", dataset_name=dataset_name,
            )
    elif fmt == "ultrafeedback" and not _looks_like_ultrafeedback(first):
        raise DataValidationError(
            "dataset_format='ultrafeedback' was asked for but row 0 has no 'instruction' + 'completions' of dicts",
            "pass dataset_format='auto' or the format the data is in", row=0, field="completions",
            dataset_name=dataset_name,
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

    def convert(example, index):
        out = converter(example, index, dataset_name=dataset_name, **converter_kwargs)
        out["_nca_num_completions"] = len(out["completions"])
        return out

    features = None
    if fmt == "ultrafeedback":
        features = _standard_features(with_dropped=True)
    elif fmt == "columns" and isinstance(first.get("A0"), str):
        features = _standard_features(with_dropped=False)
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
    total_dropped = sum(dropped_in_rows)
    if short_rows or total_dropped:
        short_set = set(short_rows)
        kept_in_short = sum(sizes[i] for i in short_rows)
        logger.warning(
            "%s dataset (%s): dropped %d of %d rows (left with fewer than 2 usable completions) and %d completions "
            "in all (%d with an unusable rating or empty text, plus %d usable ones inside the dropped rows); "
            "%d rows remain. First dropped rows: %s",
            dataset_name,
            fmt,
            len(short_rows),
            len(sizes),
            total_dropped + kept_in_short,
            total_dropped,
            kept_in_short,
            len(sizes) - len(short_rows),
            short_rows[:_MAX_REPORTED_ROWS],
        )
        if short_rows:
            converted = converted.select([i for i in range(len(sizes)) if i not in short_set])
    helper_columns = [c for c in ("_nca_num_completions", "num_dropped_completions") if c in converted.column_names]
    return converted.remove_columns(helper_columns)
