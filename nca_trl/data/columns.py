# Copyright 2025 The nca-trl authors. Licensed under the Apache License, Version 2.0.
"""The column layout of the paper's released reward data to rated completions: [`columns_to_rated`], one row (for
`datasets.map`): a `prompt`, completion columns `A0 .. A{K-1}` and a score column per completion (`A{i}_score` or
`score_A{i}`), scores under the reward rule of `nca_trl.data.rewards`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .formats import DataValidationError, _as_list, _kind, _mixed_style_error, _short, _style
from .rewards import check_rewards

__all__ = ["columns_to_rated"]

_A_COLUMN = re.compile(r"^A(\d+)$")


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
