# Copyright 2025 The nca-trl authors. Licensed under the Apache License, Version 2.0.
"""openbmb/UltraFeedback's raw rows to rated completions: [`ultrafeedback_to_rated`], one row (for `datasets.map`).

UltraFeedback ships its ratings as text (`"4"`, `"N/A"`): they are parsed here, and the ones that are not numbers left
out (or refused), the one deliberate exception to the reward rule of `nca_trl.data.rewards`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

from .formats import DataValidationError, _as_list, _is_bool, _kind, _short

__all__ = ["ULTRAFEEDBACK_ASPECTS", "ULTRAFEEDBACK_SCORE_FIELDS", "ultrafeedback_to_rated"]

#: UltraFeedback's four annotation aspects (their `Rating` is a string such as "4" or "N/A").
ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
ULTRAFEEDBACK_SCORE_FIELDS = ("overall_score", "fine-grained_score", *ULTRAFEEDBACK_ASPECTS, "mean_aspects")


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
