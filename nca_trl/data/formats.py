# Copyright 2025 The nca-trl authors. Licensed under the Apache License, Version 2.0.
"""Data formats accepted by the NCA / InfoNCA trainers, and how a row's format and style are detected.

Three layouts are accepted (the "Data formats" section of docs/trainers.md):

- **rated** (`RATED`): `{"prompt", "completions": [c_1..c_K], "rewards": [r_1..r_K]}`, K >= 2, K may vary by row.
- **preference** (`PREFERENCE`): TRL's `{"prompt", "chosen", "rejected"}`, treated as K = 2 with one-hot targets on
  the chosen completion (the paper's pairwise case): the reward temperature `alpha` never applies to a pair.
- **implicit-prompt preference** (`PREFERENCE_IMPLICIT`): TRL's `{"chosen", "rejected"}` as full texts or
  conversations; the shared prefix is the prompt (`trl.data_utils.extract_prompt`).

Each can be *standard* (strings) or *conversational* (lists of `{"role", "content"}` messages), one style per dataset.
One dataset may mix rated rows and preference rows (`MIXED`; Arrow fills the columns a row lacks with `None`): each
row keeps its own targets, `softmax(rewards / alpha)` for a rated row and one-hot on the chosen for a pair.

Rewards follow one rule (`REWARD_RULE`): every reward is a finite `int` or `float` (not a `bool`), and strings are
refused, numeric ones such as `"4.5"` included, so cast such a column first, e.g.
`ds.map(lambda r: {"rewards": [float(x) for x in r["rewards"]]})`. The one deliberate exception is a converter,
[`ultrafeedback_to_rated`], which parses UltraFeedback's raw ratings because that dataset ships them as text (`"4"`,
`"N/A"`). A row's rewards must also differ by at most float32's maximum (about 3.4e38), since the collator subtracts
each prompt's best reward in float64 and then works in float32.

The rest of the data handling lives beside this module: the one check of a reward, `check_rewards`, in
`nca_trl.data.rewards`; row and dataset validation and `to_rated` in `nca_trl.data.validation`; the raw-layout
converters [`ultrafeedback_to_rated`] in `nca_trl.data.ultrafeedback` and [`columns_to_rated`] in
`nca_trl.data.columns`, and [`convert_dataset`] (a whole dataset, any layout) in `nca_trl.data.converters`.

Every problem is reported as a [`DataValidationError`] naming the dataset, the row, the field, what is wrong and how
to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..runtime.errors import ROW_INDEX, DataError


RATED = "rated"
PREFERENCE = "preference"
PREFERENCE_IMPLICIT = "preference_implicit"
#: A dataset whose rows are rated and preference (explicit prompt) rows: `ValidationReport.format`, never a row's.
MIXED = "rated+preference"
#: Column the trainers add to a prepared dataset: True for a row that came as a preference pair (one-hot targets).
PAIR_COLUMN = "preference_pair"
#: Optional column of rated rows, one bool per completion: False for a sample cut at `max_new_tokens` (`nca-trl
#: generate` writes it), which is trained as sampled, without the EOS / end of turn a finished completion gets.
FINISHED_COLUMN = "finished"

#: The columns each format needs, in the order they are reported when missing.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    RATED: ("prompt", "completions", "rewards"),
    PREFERENCE: ("prompt", "chosen", "rejected"),
    PREFERENCE_IMPLICIT: ("chosen", "rejected"),
}

#: The dataset formats a user can name: `convert_dataset(dataset_format=...)` and the CLI's `--dataset_format`.
DATASET_FORMATS = ("auto", "rated", "preference", "ultrafeedback", "columns")

#: The one rule for a reward (quoted in the error for a string reward).
REWARD_RULE = "numeric strings are not accepted: every reward must be a finite int or float (not a bool)"

#: Largest float32 (`torch.finfo(torch.float32).max`): a row's rewards may differ by at most this much.
FLOAT32_MAX = 3.4028234663852886e38

_ACCEPTED_LAYOUTS = (
    "Accepted layouts: rated {prompt, completions, rewards}; preference {prompt, chosen, rejected}; "
    "implicit-prompt preference {chosen, rejected}"
)
_MAX_REPORTED_ROWS = 20


class DataValidationError(DataError):
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
        self, problem: str, fix: str, *, row: int | None = None, field: str = "", dataset_name: str = "train",
        also: str = "",
    ):
        self.problem = problem.rstrip(". ")
        self.fix = fix.rstrip(". ")
        self.row = row
        self.field = field
        self.dataset_name = dataset_name
        self.also = also  # the other bad rows, where the whole dataset was read (`validate_dataset`)
        where = f"{dataset_name} dataset"
        if row is not None:
            where += f", row {row}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {self.problem}. Fix: {self.fix}." + (f" {also}" if also else ""))

    @classmethod
    def first_of(cls, bad: list[DataValidationError]) -> DataValidationError:
        """The first of a dataset's bad rows' errors, its message ending with how many other rows are bad, and the
        first 20 of them with their fields: one round of fixes fixes them all."""
        first, others = bad[0], bad[1:]
        if not others:
            return first
        many = len(others) > 1
        shown = ", ".join(f"{e.row} ('{e.field}')" if e.field else f"{e.row}" for e in others[:_MAX_REPORTED_ROWS])
        also = (f"{len(others)} more row{'s' if many else ''} of the {first.dataset_name} dataset "
                f"{'are' if many else 'is'} bad too: row{'s' if many else ''} {shown}"
                f"{f' (the first {_MAX_REPORTED_ROWS})' if len(others) > _MAX_REPORTED_ROWS else ''}.")
        return cls(first.problem, first.fix, row=first.row, field=first.field, dataset_name=first.dataset_name,
                   also=also)

    def __reduce__(self):  # keep the exception picklable (datasets.map with num_proc sends it across processes)
        return (_rebuild_error, (self.problem, self.fix, self.row, self.field, self.dataset_name, self.also))


def _rebuild_error(problem, fix, row, field, dataset_name, also=""):
    return DataValidationError(problem, fix, row=row, field=field, dataset_name=dataset_name, also=also)


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


def _message_problem(message: Any, where: str) -> str | None:
    """Why `message` is not a usable chat message: a `role` and either `content` (a string, maybe empty) or, as TRL
    takes tool-call data, `tool_calls` (a non-empty list) beside empty, None or missing `content`. A key that is None is
    absent (a dataset stores the union of its messages' keys)."""
    if not isinstance(message, Mapping):
        return f"{where} is {_kind(message)}, expected a dict with 'role' and 'content'"
    if "role" not in message:
        return f"{where} has no 'role' key"
    if not isinstance(message["role"], str) or not message["role"]:
        return f"{where} has role {_short(message['role'])}, expected a non-empty string"
    content, tool_calls = message.get("content"), message.get("tool_calls")
    if tool_calls is not None:
        if not isinstance(tool_calls, (list, tuple)) or not tool_calls or not all(
            isinstance(call, Mapping) for call in tool_calls
        ):
            return f"{where} has tool_calls {_short(tool_calls)}, expected a non-empty list of calls (dicts)"
        if content is None or isinstance(content, str):
            return None
        return f"{where} has content {_kind(content)} beside its tool_calls, expected a string or none"
    if content is None:
        return f"{where} has neither content nor tool_calls"
    if isinstance(content, str):
        return None
    return f"{where} has content {_kind(content)}, expected a string"


def _conversation_problem(value: Any, what: str, *, needs_assistant: bool) -> str | None:
    """Why `value` is not a usable list of messages (`what` names it in the message). Messages may have empty
    content (an empty system turn, an empty tool result), as `trl.DPOTrainer` takes them, but not all of them."""
    if len(value) == 0:
        return f"{what} is an empty message list"
    for m, message in enumerate(value):
        problem = _message_problem(message, f"{what}, message {m},")
        if problem:
            return problem
    if all(message.get("content") == "" and message.get("tool_calls") is None for message in value):
        return f"{what} has empty content in every message"
    if needs_assistant and not any(message["role"] == "assistant" for message in value):
        roles = [message["role"] for message in value]
        return f"{what} has no assistant message (roles: {roles})"
    return None


def text_problem(value: Any, what: str, *, needs_assistant: bool) -> str | None:
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

    columns = sorted(str(k) for k in example if k != ROW_INDEX)  # the user's columns, not the trainers' row index
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
    unscored = missing == ["rewards"] and _present(example, "completions")  # `nca-trl generate`'s samples
    raise DataValidationError(
        f"missing column(s) {described}; the row has columns {columns}. {_ACCEPTED_LAYOUTS}",
        "score the completions first (`nca-trl score --dataset_name FILE --reward_funcs ... --output RATED.jsonl`)"
        if unscored else "rename or add the columns to match one layout (or drop rows that lack them)",
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




# Names that lived here before validation and the converters got their own modules: `from nca_trl.data.formats import
# validate_dataset` (and the like) keeps working, resolved on first use to avoid an import cycle.
_MOVED = {
    **dict.fromkeys(("ValidationReport", "check_rewards", "to_rated", "validate_dataset", "validate_example"),
                    "validation"),
    **dict.fromkeys(("ULTRAFEEDBACK_ASPECTS", "ULTRAFEEDBACK_SCORE_FIELDS", "ultrafeedback_to_rated"), "ultrafeedback"),
    "columns_to_rated": "columns",
    "convert_dataset": "converters",
}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
