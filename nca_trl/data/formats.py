# Copyright 2025 The nca-trl authors. Licensed under the Apache License, Version 2.0.
"""Data formats accepted by the NCA / InfoNCA trainers: detection, up-front validation and converters.

Three layouts are accepted (see `DESIGN.md` §2):

- **rated** (`RATED`): `{"prompt", "completions": [c_1..c_K], "rewards": [r_1..r_K]}`, K >= 2, K may vary by row.
- **preference** (`PREFERENCE`): TRL's `{"prompt", "chosen", "rejected"}`, treated as K = 2 with rewards (1, 0).
- **implicit-prompt preference** (`PREFERENCE_IMPLICIT`): TRL's `{"chosen", "rejected"}` as full texts or
  conversations; the shared prefix is the prompt (`trl.data_utils.extract_prompt`).

Each can be *standard* (strings) or *conversational* (lists of `{"role", "content"}` messages), one style per dataset.

Raw layouts are converted with [`ultrafeedback_to_rated`] (openbmb/UltraFeedback) and [`columns_to_rated`]
(`prompt` + `A0..A{K-1}` + scores, the paper's released reward data), or all at once with [`convert_dataset`].

Every problem is reported as a [`DataValidationError`] naming the dataset, the row, the field, what is wrong and how
to fix it.
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:  # pragma: no cover
    import datasets


logger = logging.getLogger("nca_trl")

RATED = "rated"
PREFERENCE = "preference"
PREFERENCE_IMPLICIT = "preference_implicit"

#: The columns each format needs, in the order they are reported when missing.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    RATED: ("prompt", "completions", "rewards"),
    PREFERENCE: ("prompt", "chosen", "rejected"),
    PREFERENCE_IMPLICIT: ("chosen", "rejected"),
}

#: Values accepted by `convert_dataset(dataset_format=...)`.
DATASET_FORMATS = ("auto", "rated", "preference", "ultrafeedback", "columns")

#: UltraFeedback's four annotation aspects (their `Rating` is a string such as "4" or "N/A").
ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
ULTRAFEEDBACK_SCORE_FIELDS = ("overall_score", "fine-grained_score", *ULTRAFEEDBACK_ASPECTS, "mean_aspects")

_ACCEPTED_LAYOUTS = (
    "Accepted layouts: rated {prompt, completions, rewards}; preference {prompt, chosen, rejected}; "
    "implicit-prompt preference {chosen, rejected}"
)
_MAX_REPORTED_ROWS = 20
_A_COLUMN = re.compile(r"^A(\d+)$")


class DataValidationError(ValueError):
    r"""
    A dataset row that the trainers cannot use. The message always names the dataset, the row, the field, the problem
    and the fix:

    ```
    train dataset, row 12, field 'rewards': reward at position 2 is NaN. Fix: give every completion a finite number (or drop the row).
    ```

    Args:
        problem (`str`):
            What is wrong.
        fix (`str`):
            What to do about it.
        row (`int` or `None`, *optional*):
            Index of the offending row, `None` when unknown.
        field (`str`, *optional*, defaults to `""`):
            The offending column (or path inside it, e.g. `"completions[2].annotations.honesty.Rating"`).
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Which dataset (`"train"`, `"eval"`, ...).
    """

    def __init__(
        self, problem: str, fix: str, *, row: int | None = None, field: str = "", dataset_name: str = "train"
    ):
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip(". ")
        self.row = row
        self.field = field
        self.dataset_name = dataset_name
        where = f"{dataset_name} dataset"
        if row is not None:
            where += f", row {row}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {self.problem}. Fix: {self.fix}.")

    def __reduce__(self):  # keep the exception picklable (datasets.map with num_proc sends it across processes)
        return (_rebuild_error, (self.problem, self.fix, self.row, self.field, self.dataset_name))


def _rebuild_error(problem, fix, row, field, dataset_name):
    return DataValidationError(problem, fix, row=row, field=field, dataset_name=dataset_name)


# ----------------------------------------------------------------------------------------------------------- helpers


def _present(example: Mapping, key: str) -> bool:
    # Arrow fills a column that a row lacks with None: treat that as missing.
    return key in example and example[key] is not None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a dict"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _style(value: Any) -> str | None:
    """`"standard"` for a string, `"conversational"` for a list (of messages, checked elsewhere), else `None`."""
    if isinstance(value, str):
        return "standard"
    if isinstance(value, (list, tuple)):
        return "conversational"
    return None


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and isinstance(value[0], Mapping)
        and "role" in value[0]
    )


def _as_list(value: Any) -> Any:
    # numpy arrays / torch tensors (a dataset with a numeric format) -> plain lists
    if not isinstance(value, (list, tuple, str, Mapping)) and hasattr(value, "tolist"):
        return value.tolist()
    return value


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ in ("bool_", "bool8")


def _reward_problem(value: Any) -> str | None:
    """Why `value` is not a usable reward, or `None` when it is (a finite int/float, not a bool)."""
    if value is None:
        return "is None"
    if _is_bool(value):
        return f"is the boolean {value!r}, not a number"
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return f"is the string {_short(value)}, not a number"
        return f"is the string {_short(value)}; numeric strings are not accepted"
    if not isinstance(value, numbers.Real):
        return f"is {_kind(value)}, not a number"
    value = float(value)
    if math.isnan(value):
        return "is NaN"
    if math.isinf(value):
        return f"is {'+' if value > 0 else '-'}inf"
    return None


def _message_problem(message: Any, where: str, *, empty_ok: bool = False) -> str | None:
    if not isinstance(message, Mapping):
        return f"{where} is {_kind(message)}, expected a dict with 'role' and 'content'"
    if "role" not in message or "content" not in message:
        missing = [k for k in ("role", "content") if k not in message]
        return f"{where} has no {' or '.join(repr(k) for k in missing)} key"
    if not isinstance(message["role"], str) or not message["role"]:
        return f"{where} has role {_short(message['role'])}, expected a non-empty string"
    content = message["content"]
    if isinstance(content, str) and (content or empty_ok or message.get("tool_calls")):
        return None
    if isinstance(content, str):
        return f"{where} has empty content"
    return f"{where} has content {_kind(content)}, expected a non-empty string"


def _conversation_problem(value: Any, what: str, *, needs_assistant: bool) -> str | None:
    """Why `value` is not a usable list of messages (`what` names it in the message)."""
    if len(value) == 0:
        return f"{what} is an empty message list"
    for m, message in enumerate(value):
        problem = _message_problem(message, f"{what}, message {m},")
        if problem:
            return problem
    if needs_assistant and not any(message["role"] == "assistant" for message in value):
        roles = [message["role"] for message in value]
        return f"{what} has no assistant message (roles: {roles})"
    return None


def _text_problem(value: Any, what: str, *, needs_assistant: bool) -> str | None:
    """Why `value` (a string or a list of messages) is not a usable prompt/completion."""
    style = _style(value)
    if style is None:
        return f"{what} is {_kind(value)}, expected a string or a list of messages"
    if style == "standard":
        return f"{what} is an empty string" if value == "" else None
    return _conversation_problem(value, what, needs_assistant=needs_assistant)


_STYLE_FIX = (
    "use one style per dataset: either every prompt and completion a string (standard), or every prompt and "
    "completion a list of {'role', 'content'} messages (conversational)"
)


def _mixed_style_error(name_a, style_a, name_b, style_b, index, dataset_name, field):
    return DataValidationError(
        f"mixed standard/conversational styles: {name_a} is {_style_word(style_a)} but {name_b} is "
        f"{_style_word(style_b)}",
        _STYLE_FIX,
        row=index,
        field=field,
        dataset_name=dataset_name,
    )


def _style_word(style: str) -> str:
    return "a string (standard)" if style == "standard" else "a list of messages (conversational)"


# ---------------------------------------------------------------------------------------------------- detection


def _looks_like_ultrafeedback(example: Mapping) -> bool:
    completions = example.get("completions")
    return (
        _present(example, "instruction")
        and isinstance(completions, (list, tuple))
        and len(completions) > 0
        and isinstance(completions[0], Mapping)
    )


def _looks_like_columns(example: Mapping) -> bool:
    return "A0" in example and "A1" in example


def detect_format(example: dict, index: int | None = 0, dataset_name: str = "train") -> str:
    r"""
    Detects which accepted format a row is in.

    A column whose value is `None` counts as missing (Arrow fills the columns a row lacks with `None`). A row with both
    the rated columns and the preference columns is read as rated.

    Args:
        example (`dict`):
            One row.
        index (`int` or `None`, *optional*, defaults to `0`):
            Row index, for the error message.
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Dataset name, for the error message.

    Returns:
        `str`: `RATED` (`"rated"`), `PREFERENCE` (`"preference"`) or `PREFERENCE_IMPLICIT` (`"preference_implicit"`).

    Raises:
        `DataValidationError`: when the row fits none of them; the message names the missing columns and the accepted
        layouts, and points to [`ultrafeedback_to_rated`] / [`columns_to_rated`] for those raw layouts.

    Examples:

    ```python
    >>> detect_format({"prompt": "2+2=", "completions": ["4", "5"], "rewards": [1.0, 0.0]})
    'rated'
    >>> detect_format({"prompt": "2+2=", "chosen": "4", "rejected": "5"})
    'preference'
    >>> detect_format({"chosen": "2+2=4", "rejected": "2+2=5"})
    'preference_implicit'
    ```
    """
    if _present(example, "completions") and _present(example, "rewards"):
        if _present(example, "prompt"):
            return RATED
        target = RATED
    elif _present(example, "chosen") and _present(example, "rejected"):
        return PREFERENCE if _present(example, "prompt") else PREFERENCE_IMPLICIT
    elif _present(example, "chosen") or _present(example, "rejected"):
        target = PREFERENCE
    else:
        target = RATED

    columns = sorted(str(k) for k in example)
    if _looks_like_ultrafeedback(example):
        raise DataValidationError(
            f"this row is in UltraFeedback's raw layout ('instruction' + 'completions' of dicts), not an accepted "
            f"layout. {_ACCEPTED_LAYOUTS}",
            "convert it first: `convert_dataset(ds, 'ultrafeedback')` or "
            "`ds.map(ultrafeedback_to_rated, with_indices=True)` from nca_trl.data",
            row=index,
            field="rewards" if "rewards" not in example else "completions",
            dataset_name=dataset_name,
        )
    if _looks_like_columns(example):
        raise DataValidationError(
            f"this row is in the column layout (A0, A1, ... + score columns), not an accepted layout. "
            f"{_ACCEPTED_LAYOUTS}",
            "convert it first: `convert_dataset(ds, 'columns')` or `ds.map(columns_to_rated, with_indices=True)` "
            "from nca_trl.data",
            row=index,
            field="completions",
            dataset_name=dataset_name,
        )
    if target == PREFERENCE:
        missing = [c for c in ("chosen", "rejected") if not _present(example, c)]
    else:
        missing = [c for c in REQUIRED_COLUMNS[RATED] if not _present(example, c)]
    described = ", ".join(
        f"'{c}' (present but None)" if c in example else f"'{c}'" for c in missing
    )
    raise DataValidationError(
        f"missing column(s) {described}; the row has columns {columns}. {_ACCEPTED_LAYOUTS}",
        "rename or add the columns to match one layout (or drop rows that lack them)",
        row=index,
        field=missing[0],
        dataset_name=dataset_name,
    )


def is_conversational_example(example: dict) -> bool:
    r"""
    Whether a row is conversational in TRL's sense: its first text column (`prompt`, `chosen`, `rejected`,
    `completion`, `messages`, or the first of `completions`) is a list of `{"role", "content"}` messages.

    Unlike `trl.data_utils.is_conversational` this also understands rated rows (`completions`) and does not fail on
    empty lists.

    Args:
        example (`dict`):
            One row.

    Returns:
        `bool`: `True` for conversational rows, `False` for standard ones.

    Examples:

    ```python
    >>> is_conversational_example({"prompt": [{"role": "user", "content": "Hi"}]})
    True
    >>> is_conversational_example({"prompt": "Hi", "chosen": "Hello", "rejected": "Go away"})
    False
    ```
    """
    for key in ("prompt", "chosen", "rejected", "completion", "messages"):
        if _present(example, key):
            return _is_messages(example[key])
    completions = example.get("completions")
    if isinstance(completions, (list, tuple)) and completions:
        return _is_messages(completions[0])
    return False


def _row_style(example: Mapping, fmt: str) -> str | None:
    """Style of a row's leading text column (the rest is checked against it by `validate_example`)."""
    return _style(example["chosen"] if fmt == PREFERENCE_IMPLICIT else example["prompt"])


# --------------------------------------------------------------------------------------------------- validation


def _check_prompt(example, index, dataset_name):
    prompt = example["prompt"]
    problem = _text_problem(prompt, "the prompt", needs_assistant=False)
    if problem:
        raise DataValidationError(
            problem,
            "give every row a non-empty prompt: a string, or a non-empty list of {'role', 'content'} messages "
            "(or drop the row)",
            row=index,
            field="prompt",
            dataset_name=dataset_name,
        )
    return _style(prompt)


def _check_completion(value, what, field, style, style_name, index, dataset_name):
    """A completion (rated completion, chosen or rejected) of the given row `style`."""
    own = _style(value)
    if own is not None and style is not None and own != style:
        raise _mixed_style_error(style_name, style, what, own, index, dataset_name, field)
    problem = _text_problem(value, what, needs_assistant=True)
    if problem:
        if own == "conversational":
            fix = (
                "give every conversational completion a non-empty list of {'role', 'content'} messages with an "
                "assistant turn, e.g. [{'role': 'assistant', 'content': '...'}] (or drop the row)"
            )
        else:
            fix = "give every completion non-empty text (or drop the row)"
        raise DataValidationError(problem, fix, row=index, field=field, dataset_name=dataset_name)


def _validate_rated(example, index, dataset_name):
    style = _check_prompt(example, index, dataset_name)
    completions = _as_list(example["completions"])
    rewards = _as_list(example["rewards"])
    if not isinstance(completions, (list, tuple)):
        raise DataValidationError(
            f"'completions' is {_kind(completions)}, expected a list of K >= 2 completions",
            "store the completions of a prompt as a list, e.g. ['answer 1', 'answer 2']",
            row=index,
            field="completions",
            dataset_name=dataset_name,
        )
    if not isinstance(rewards, (list, tuple)):
        raise DataValidationError(
            f"'rewards' is {_kind(rewards)}, expected a list with one number per completion",
            "store the rewards of a prompt as a list of numbers, e.g. [7.5, 3.0]",
            row=index,
            field="rewards",
            dataset_name=dataset_name,
        )
    if len(completions) < 2:
        raise DataValidationError(
            f"K = {len(completions)} completion(s); NCA/InfoNCA need K >= 2 completions per prompt",
            "give every prompt at least 2 rated completions (or drop the row)",
            row=index,
            field="completions",
            dataset_name=dataset_name,
        )
    if len(rewards) != len(completions):
        raise DataValidationError(
            f"{len(completions)} completions but {len(rewards)} rewards",
            "give exactly one reward per completion, in the same order",
            row=index,
            field="rewards",
            dataset_name=dataset_name,
        )
    for i, completion in enumerate(completions):
        _check_completion(
            completion, f"completion {i}", "completions", style, "the prompt", index, dataset_name
        )
    for i, reward in enumerate(rewards):
        problem = _reward_problem(reward)
        if problem:
            fix = "give every completion a finite number (or drop the row)"
            if isinstance(reward, str):
                fix = "convert the rewards to numbers (e.g. `float(r)`) before training, or drop the row"
            raise DataValidationError(
                f"reward at position {i} {problem}", fix, row=index, field="rewards", dataset_name=dataset_name
            )


def _common_prefix_len(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _check_implicit(example, index, dataset_name):
    chosen, rejected = example["chosen"], example["rejected"]
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        problem = _text_problem(value, f"'{name}'", needs_assistant=True)
        if problem:
            raise DataValidationError(
                problem,
                f"give '{name}' the full non-empty conversation or text, prompt included (or drop the row)",
                row=index,
                field=name,
                dataset_name=dataset_name,
            )
    if _style(chosen) != _style(rejected):
        raise _mixed_style_error("'chosen'", _style(chosen), "'rejected'", _style(rejected), index, dataset_name,
                                 "rejected")
    unit = "message" if _style(chosen) == "conversational" else "character"
    shared = _common_prefix_len(chosen, rejected)
    fix = "give the prompt in a 'prompt' column and only the replies in 'chosen'/'rejected' (or drop the row)"
    if chosen == rejected:
        problem = "'chosen' and 'rejected' are identical, so no prompt can be extracted from them"
        raise DataValidationError(problem, fix, row=index, field="rejected", dataset_name=dataset_name)
    if shared == 0:
        problem = (f"'chosen' and 'rejected' differ from their first {unit}, so there is no shared prompt to "
                   f"extract")
        raise DataValidationError(problem, fix, row=index, field="chosen", dataset_name=dataset_name)
    # When one is a prefix of the other, `extract_prompt` keeps the last character/message of the shorter one as its
    # completion (HH-RLHF has replies that are a single space), so both completions stay non-empty: accepted.


def validate_example(example: dict, index: int, dataset_name: str = "train") -> None:
    r"""
    Checks one row of any accepted format and raises on the first problem.

    Checked: the columns of the format are present; a prompt is a non-empty string or a non-empty message list;
    rated rows have K >= 2 completions and exactly one finite numeric reward each (booleans, `None` and numeric
    strings such as `"7"` are refused); no completion / chosen / rejected is empty (`""`, an empty message list or a
    message with empty content); conversational completions are lists of `{"role", "content"}` messages with an
    assistant turn; one style (standard or conversational) throughout the row; for implicit-prompt preference rows,
    that a prompt can be extracted (`chosen` and `rejected` differ but share a non-empty prefix).
    Whitespace-only text is accepted (it is a real token sequence).

    Args:
        example (`dict`):
            One row.
        index (`int`):
            Its index, for the error message.
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Dataset name, for the error message.

    Raises:
        `DataValidationError`: naming the row, the field, the problem and the fix.

    Examples:

    ```python
    >>> validate_example({"prompt": "2+2=", "completions": ["4", "5"], "rewards": [1.0, 0.0]}, 0)
    >>> validate_example({"prompt": "2+2=", "completions": ["4", "5"], "rewards": [1.0, float("nan")]}, 3)
    Traceback (most recent call last):
    ...
    DataValidationError: train dataset, row 3, field 'rewards': reward at position 1 is NaN. Fix: give every completion a finite number (or drop the row).
    ```
    """
    fmt = detect_format(example, index, dataset_name)
    if fmt == RATED:
        _validate_rated(example, index, dataset_name)
    elif fmt == PREFERENCE:
        style = _check_prompt(example, index, dataset_name)
        for name in ("chosen", "rejected"):
            _check_completion(example[name], f"'{name}'", name, style, "the prompt", index, dataset_name)
    else:
        _check_implicit(example, index, dataset_name)


@dataclass
class ValidationReport:
    r"""
    What [`validate_dataset`] found.

    Args:
        dataset_name (`str`): Dataset name.
        format (`str`): `"rated"`, `"preference"` or `"preference_implicit"`.
        conversational (`bool`): Whether the rows are conversational.
        num_rows (`int`): Number of rows checked (all of them).
        num_all_equal_rewards (`int`): Rows whose rewards are all equal (legal: their targets are uniform).
        all_equal_rows (`list[int]`): The first (up to 20) of those rows.
        k_histogram (`dict[int, int]`): K (completions per prompt) -> number of rows.
    """

    dataset_name: str
    format: str
    conversational: bool
    num_rows: int
    num_all_equal_rewards: int = 0
    all_equal_rows: list[int] = dataclass_field(default_factory=list)
    k_histogram: dict[int, int] = dataclass_field(default_factory=dict)

    def summary(self) -> str:
        """One human-readable line, e.g. `train dataset: 80 rows, rated (standard), K=4: 80 rows; 6 rows with ...`."""
        style = "conversational" if self.conversational else "standard"
        ks = ", ".join(f"K={k}: {n} rows" for k, n in sorted(self.k_histogram.items()))
        line = f"{self.dataset_name} dataset: {self.num_rows} rows, {self.format} ({style}), {ks or 'no rows'}"
        if self.num_all_equal_rewards:
            more = "..." if self.num_all_equal_rewards > len(self.all_equal_rows) else ""
            rows = ", ".join(map(str, self.all_equal_rows))
            line += (
                f"; {self.num_all_equal_rewards} rows with all-equal rewards (uniform targets), rows [{rows}{more}]"
            )
        else:
            line += "; no rows with all-equal rewards"
        return line


def _iter_rows(dataset, columns: list[str] | None):
    """Rows as plain dicts. A `datasets.Dataset` is read in Arrow batches of the needed columns only, unformatted."""
    try:
        import datasets
    except ImportError:  # pragma: no cover
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        ds = dataset.with_format(None)
        if columns is not None:
            ds = ds.select_columns([c for c in columns if c in ds.column_names])
        for batch in ds.iter(batch_size=1000):
            keys = list(batch)
            for values in zip(*batch.values()):
                yield dict(zip(keys, values))
    else:
        yield from dataset


def _first_row(dataset) -> Mapping:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        datasets = None
    if datasets is not None and isinstance(dataset, datasets.Dataset):
        return dataset.with_format(None)[0]
    if isinstance(dataset, (list, tuple)):
        return dataset[0]
    return next(iter(dataset))


def _num_rows(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def validate_dataset(dataset, dataset_name: str = "train") -> ValidationReport:
    r"""
    Validates every row of a dataset before training and summarises it.

    The format and the style (standard / conversational) are read from row 0; every row must be in the same format and
    style and pass [`validate_example`]. Rows whose rewards are all equal are legal (uniform targets) but counted,
    and a warning with their number is logged on the `"nca_trl"` logger.

    A `datasets.Dataset` is read column-wise in Arrow batches (about 1 s per 100k rows of K = 4 on one core); any other
    iterable of dicts (e.g. a list) is read row by row.

    Args:
        dataset (`datasets.Dataset` or iterable of `dict`):
            The dataset to check.
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Name used in messages (`"train"`, `"eval"`, ...).

    Returns:
        [`ValidationReport`]

    Raises:
        `DataValidationError`: on the first bad row, naming the row, the field, the problem and the fix.

    Examples:

    ```python
    >>> from datasets import load_dataset
    >>> ds = load_dataset("json", data_files="data/vicuna_rated.jsonl", split="train")
    >>> report = validate_dataset(ds)
    >>> report.summary()
    'train dataset: 80 rows, rated (standard), K=4: 80 rows; 6 rows with all-equal rewards (uniform targets), rows [...]'
    ```
    """
    if _num_rows(dataset) == 0:
        raise DataValidationError(
            "the dataset has no rows", "pass a dataset with at least one row", field="", dataset_name=dataset_name
        )
    first = _first_row(dataset)
    fmt = detect_format(first, 0, dataset_name)
    validate_example(first, 0, dataset_name)
    style = _row_style(first, fmt)
    required = REQUIRED_COLUMNS[fmt]
    # Only the format's own columns are read (a rated dataset with "chosen"/"rejected" too is still read as rated).
    columns = list(required) if fmt != PREFERENCE_IMPLICIT else ["chosen", "rejected", "prompt"]

    report = ValidationReport(dataset_name=dataset_name, format=fmt, conversational=style == "conversational",
                              num_rows=0)
    k_hist: dict[int, int] = {}
    for index, row in enumerate(_iter_rows(dataset, columns)):
        row_fmt = detect_format(row, index, dataset_name)
        if row_fmt != fmt:
            missing = [c for c in required if not _present(row, c)]
            if missing:
                bad, detail = missing[0], f" (missing column(s) {missing})"
            else:
                bad = "prompt" if fmt == PREFERENCE_IMPLICIT else REQUIRED_COLUMNS[row_fmt][-1]
                detail = f" (it has the '{bad}' column of the '{row_fmt}' format)"
            raise DataValidationError(
                f"this row is in the '{row_fmt}' format but row 0 is in the '{fmt}' format" + detail,
                "use one format for the whole dataset (convert the odd rows, or drop them)",
                row=index,
                field=bad,
                dataset_name=dataset_name,
            )
        validate_example(row, index, dataset_name)
        row_style = _row_style(row, fmt)
        if row_style != style:
            lead = "chosen" if fmt == PREFERENCE_IMPLICIT else "prompt"
            raise DataValidationError(
                f"mixed standard/conversational styles across rows: '{lead}' is {_style_word(row_style)} here but "
                f"{_style_word(style)} in row 0",
                _STYLE_FIX,
                row=index,
                field=lead,
                dataset_name=dataset_name,
            )
        if fmt == RATED:
            rewards = _as_list(row["rewards"])
            k = len(rewards)
            if all(r == rewards[0] for r in rewards[1:]):
                report.num_all_equal_rewards += 1
                if len(report.all_equal_rows) < _MAX_REPORTED_ROWS:
                    report.all_equal_rows.append(index)
        else:
            k = 2
        k_hist[k] = k_hist.get(k, 0) + 1
        report.num_rows += 1

    report.k_histogram = dict(sorted(k_hist.items()))
    if report.num_all_equal_rewards:
        logger.warning(
            "%s dataset: %d of %d rows have all-equal rewards (legal: their targets are uniform over the "
            "completions); first rows: %s",
            dataset_name,
            report.num_all_equal_rewards,
            report.num_rows,
            report.all_equal_rows,
        )
    return report


# --------------------------------------------------------------------------------------------------- converters


def to_rated(example: dict, index: int | None = None, dataset_name: str = "train") -> dict:
    r"""
    Converts a row of any accepted format to the rated format.

    - rated rows pass through, with rewards as `float`;
    - preference rows become `{"prompt": p, "completions": [chosen, rejected], "rewards": [1.0, 0.0]}`;
    - implicit-prompt rows are split with `trl.data_utils.extract_prompt` first (as `DPOTrainer` does), then as above.

    Only the three keys are returned (`datasets.map` keeps the other columns unless removed).

    Args:
        example (`dict`):
            One row.
        index (`int` or `None`, *optional*):
            Its index, for error messages (pass `with_indices=True` to `datasets.map`).
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Dataset name, for error messages.

    Returns:
        `dict`: `{"prompt", "completions", "rewards"}`.

    Raises:
        `DataValidationError`: for unusable rewards, or an implicit-prompt row with no extractable prompt.

    Examples:

    ```python
    >>> to_rated({"prompt": "2+2=", "chosen": "4", "rejected": "5"})
    {'prompt': '2+2=', 'completions': ['4', '5'], 'rewards': [1.0, 0.0]}
    >>> to_rated({"chosen": "2+2= 4", "rejected": "2+2= 5"})
    {'prompt': '2+2=', 'completions': [' 4', ' 5'], 'rewards': [1.0, 0.0]}
    ```
    """
    fmt = detect_format(example, index, dataset_name)
    if fmt == RATED:
        rewards = _as_list(example["rewards"])
        if not isinstance(rewards, (list, tuple)):
            raise DataValidationError(
                f"'rewards' is {_kind(rewards)}, expected a list of numbers",
                "store the rewards of a prompt as a list of numbers",
                row=index, field="rewards", dataset_name=dataset_name,
            )
        out = []
        for i, reward in enumerate(rewards):
            problem = _reward_problem(reward)
            if problem:
                raise DataValidationError(
                    f"reward at position {i} {problem}",
                    "give every completion a finite number (or drop the row)",
                    row=index, field="rewards", dataset_name=dataset_name,
                )
            out.append(float(reward))
        return {"prompt": example["prompt"], "completions": list(_as_list(example["completions"])), "rewards": out}
    if fmt == PREFERENCE_IMPLICIT:
        _check_implicit(example, index, dataset_name)
        from trl.data_utils import extract_prompt

        example = extract_prompt({"chosen": example["chosen"], "rejected": example["rejected"]})
    return {
        "prompt": example["prompt"],
        "completions": [example["chosen"], example["rejected"]],
        "rewards": [1.0, 0.0],
    }


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

    cells, rewards, names = [], [], []
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
        problem = _reward_problem(score)
        if problem:
            raise DataValidationError(
                f"the score of completion A{i} {problem}",
                f"give {score_name} a finite number (or drop the row)",
                row=index, field=score_name, dataset_name=dataset_name,
            )
        cells.append(cell)
        rewards.append(float(score))
        names.append(f"A{i}")

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


# --------------------------------------------------------------------------------------------------- datasets


def _detect_raw_format(example: Mapping, dataset_name: str) -> str:
    """`"rated"`, `"preference"`, `"ultrafeedback"` or `"columns"` for row 0 (raises if none fits)."""
    try:
        fmt = detect_format(example, 0, dataset_name)
    except DataValidationError:
        if _looks_like_ultrafeedback(example):
            return "ultrafeedback"
        if _looks_like_columns(example):
            return "columns"
        raise
    return "rated" if fmt == RATED else "preference"


def _standard_features(with_dropped: bool):
    import datasets

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
    import datasets

    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"dataset_format={dataset_format!r} is not one of {list(DATASET_FORMATS)}")
    if isinstance(dataset, (list, tuple)):
        dataset = datasets.Dataset.from_list(list(dataset))
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"convert_dataset needs a datasets.Dataset or a list of dicts, got {type(dataset).__name__}")
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
        converter = to_rated
    elif fmt == "ultrafeedback":
        if not _looks_like_ultrafeedback(first):
            raise DataValidationError(
                "dataset_format='ultrafeedback' was asked for but row 0 has no 'instruction' + 'completions' of dicts",
                "pass dataset_format='auto' or the format the data is in", row=0, field="completions",
                dataset_name=dataset_name,
            )
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
