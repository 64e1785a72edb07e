# Copyright 2025 The nca-trl authors. Licensed under the Apache License, Version 2.0.
"""Up-front validation of the rows the trainers accept, and their conversion to rated completions (`to_rated`).

This is where a row is validated, once, on the way to training: the trainers' dataset preparation
(`nca_trl.data.tokenize.prepare_rated_dataset`) calls [`validate_dataset`] (every row of a `datasets.Dataset`: one
format detection and one reward check per row, with a [`ValidationReport`]) or [`validate_example`] (each row of a
stream as it is read), then converts with [`to_rated_unchecked`], which checks nothing again and takes the format
from the report (only a dataset mixing rated rows and pairs is read row by row for which kind each row is).
Tokenization and the collator trust the rows that passed. `nca-trl train` hands rated and preference rows to the
trainer as loaded, so this is their one check too; raw layouts (UltraFeedback, columns) are parsed by their
converters, which check each rating as they parse it. A reward is checked in exactly one function,
`nca_trl.data.rewards.check_rewards`, which states the rule. See `nca_trl.data.formats` for the layouts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import datasets
from trl.data_utils import common_prefix_length, extract_prompt

from ..runtime.errors import ROW_INDEX
from .formats import (
    _MAX_REPORTED_ROWS,
    MIXED,
    PAIR_COLUMN,
    _STYLE_FIX,
    PREFERENCE,
    PREFERENCE_IMPLICIT,
    RATED,
    REQUIRED_COLUMNS,
    DataValidationError,
    _as_list,
    _kind,
    _mixed_style_error,
    _present,
    _row_style,
    _style,
    _style_word,
    detect_format,
    text_problem,
)
from .rewards import check_rewards, rewards_tie


logger = logging.getLogger("nca_trl")

__all__ = ["ValidationReport", "check_same_layout", "to_rated", "to_rated_unchecked", "validate_dataset", "validate_example"]


# --------------------------------------------------------------------------------------------------- validation


def _rewards_list(example: Mapping, index, dataset_name) -> list:
    rewards = _as_list(example["rewards"])
    if not isinstance(rewards, (list, tuple)):
        raise DataValidationError(
            f"'rewards' is {_kind(rewards)}, expected a list with one number per completion",
            "store the rewards of a prompt as a list of numbers, e.g. [7.5, 3.0]",
            row=index, field="rewards", dataset_name=dataset_name,
        )
    return rewards


def _check_prompt(example, index, dataset_name):
    prompt = example["prompt"]
    problem = text_problem(prompt, "the prompt", needs_assistant=False)
    if problem:
        raise DataValidationError(
            problem,
            "give every row a non-empty prompt: a string, or a non-empty list of {'role', 'content'} messages, "
            "at least one of them with content (or drop the row)",
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
    problem = text_problem(value, what, needs_assistant=True)
    if problem:
        if own == "conversational":
            fix = (
                "give every conversational completion a non-empty list of {'role', 'content'} messages with an "
                "assistant turn, e.g. [{'role': 'assistant', 'content': '...'}], or an assistant turn with "
                "'tool_calls' (or drop the row)"
            )
        else:
            fix = "give every completion non-empty text (or drop the row)"
        raise DataValidationError(problem, fix, row=index, field=field, dataset_name=dataset_name)


def _validate_rated(example, index, dataset_name):
    style = _check_prompt(example, index, dataset_name)
    completions = _as_list(example["completions"])
    if not isinstance(completions, (list, tuple)):
        raise DataValidationError(
            f"'completions' is {_kind(completions)}, expected a list of K >= 2 completions",
            "store the completions of a prompt as a list, e.g. ['answer 1', 'answer 2']",
            row=index,
            field="completions",
            dataset_name=dataset_name,
        )
    rewards = _rewards_list(example, index, dataset_name)
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
    check_rewards(rewards, index, dataset_name)
    _check_pair_flag(example, completions, rewards, index, dataset_name)


def _check_pair_flag(example, completions, rewards, index, dataset_name):
    """A rated row converted from a pair (`to_rated`) carries `preference_pair=True`: K = 2, chosen first and better."""
    flag = example.get(PAIR_COLUMN)
    if flag is None or flag is False:
        return
    fix = (f"'{PAIR_COLUMN}' is set by `to_rated` on rows that came as chosen/rejected pairs: leave it to nca-trl, "
           "or remove the column")
    if flag is not True:
        raise DataValidationError(f"'{PAIR_COLUMN}' is {_kind(flag)}, expected True or False", fix,
                                  row=index, field=PAIR_COLUMN, dataset_name=dataset_name)
    if len(completions) != 2 or not float(rewards[0]) > float(rewards[1]):
        raise DataValidationError(
            f"'{PAIR_COLUMN}' is True (a chosen/rejected pair, one-hot on the chosen) but the row has "
            f"{len(completions)} completions with rewards {list(rewards)}, not a chosen completion followed by a "
            "worse rejected one", fix, row=index, field=PAIR_COLUMN, dataset_name=dataset_name,
        )


def _check_implicit(example, index, dataset_name):
    chosen, rejected = example["chosen"], example["rejected"]
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        problem = text_problem(value, f"'{name}'", needs_assistant=True)
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
    shared = common_prefix_length(chosen, rejected)
    fix = "give the prompt in a 'prompt' column and only the replies in 'chosen'/'rejected' (or drop the row)"
    if chosen == rejected:
        problem = "'chosen' and 'rejected' are identical, so no prompt can be extracted from them"
        raise DataValidationError(problem, fix, row=index, field="rejected", dataset_name=dataset_name)
    if shared == 0:
        problem = (f"'chosen' and 'rejected' differ from their first {unit}, so there is no shared prompt to "
                   f"extract")
        raise DataValidationError(problem, fix, row=index, field="chosen", dataset_name=dataset_name)
    # When one is a prefix of the other, `extract_prompt` keeps the last character/message of the shorter one as its
    # completion (HH-RLHF has replies that are a single space), so both completions stay non-empty: accepted. What it
    # extracts can still be empty (" yes" / " no": a shared space goes to the completions), as `prompt: ""` is refused
    extracted = extract_prompt({"chosen": chosen, "rejected": rejected})
    what = f"the prompt extracted from 'chosen' and 'rejected' (their shared start, {shared} {unit}(s))"
    problem = text_problem(extracted["prompt"], what, needs_assistant=False) if extracted["prompt"] else \
        f"{what} is empty"
    if problem:
        raise DataValidationError(problem, fix, row=index, field="chosen", dataset_name=dataset_name)
    for name in ("chosen", "rejected"):  # each conversation has content, but its reply after the prompt may not
        problem = text_problem(extracted[name], f"the reply of '{name}' after the shared prompt", needs_assistant=True)
        if problem:
            raise DataValidationError(problem, f"give '{name}' a non-empty reply (or drop the row)", row=index,
                                      field=name, dataset_name=dataset_name)


def validate_example(example: dict, index: int, dataset_name: str = "train") -> None:
    r"""
    Checks one row of any accepted format and raises on the first problem.

    Checked: the columns of the format are present; a prompt is a non-empty string or a non-empty message list;
    rated rows have K >= 2 completions and exactly one reward each, checked by [`check_rewards`] (finite `int` or
    `float`; booleans, `None` and strings, numeric ones such as `"7"` included, are refused; differences within
    float32's range); no completion / chosen / rejected is empty (`""`, an empty message list or messages that all
    have empty content: an empty message among others, such as an empty system turn, is fine); conversational
    completions are lists of `{"role", "content"}` messages with an assistant turn; one style (standard or conversational) throughout the row; for implicit-prompt preference rows,
    that a non-empty prompt can be extracted (`chosen` and `rejected` differ and share more than a space).
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
        format (`str`): `"rated"`, `"preference"`, `"preference_implicit"`, or `"rated+preference"` (`MIXED`) for a
            dataset mixing rated rows and preference rows.
        conversational (`bool`): Whether the rows are conversational.
        num_rows (`int`): Number of rows checked (all of them).
        num_all_equal_rewards (`int`): Rows whose rewards are all equal (legal: their targets are uniform).
        all_equal_rows (`list[int]`): The first (up to 20) of those rows.
        k_histogram (`dict[int, int]`): K (completions per prompt) -> number of rows.
        num_pairs (`int`): Rows that are preference pairs (one-hot targets on the chosen, whatever `alpha` is).
    """

    dataset_name: str
    format: str
    conversational: bool
    num_rows: int
    num_all_equal_rewards: int = 0
    all_equal_rows: list[int] = dataclass_field(default_factory=list)
    k_histogram: dict[int, int] = dataclass_field(default_factory=dict)
    num_pairs: int = 0

    def summary(self) -> str:
        """One human-readable line, e.g. `train dataset: 80 rows, rated (standard), K=4: 80 rows; 6 rows with ...`."""
        style = "conversational" if self.conversational else "standard"
        ks = ", ".join(f"K={k}: {n} rows" for k, n in sorted(self.k_histogram.items()))
        line = f"{self.dataset_name} dataset: {self.num_rows} rows, {self.format} ({style}), {ks or 'no rows'}"
        if self.num_pairs:
            line += f"; {self.num_pairs} preference pairs (one-hot targets on the chosen; alpha does not apply)"
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
    if isinstance(dataset, datasets.Dataset):
        ds = dataset.with_format(None)
        if columns is not None:
            ds = ds.select_columns([c for c in columns if c in ds.column_names])
        for batch in ds.iter(batch_size=1000):
            for values in zip(*batch.values()):
                yield dict(zip(batch, values))
    else:
        yield from dataset


def _first_row(dataset) -> Mapping:
    if isinstance(dataset, datasets.Dataset):
        return dataset.with_format(None)[0]
    if isinstance(dataset, (list, tuple)):
        return dataset[0]
    return next(iter(dataset))


def _num_rows(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


def check_same_layout(row: Mapping, index, fmt: str, style: str | None, first_row,
                      dataset_name: str = "train") -> str:
    """The format of `row` after [`validate_example`], refused (naming `index`) unless it is in the format `fmt` and
    style `style` of the dataset's first row `first_row` (rated rows and preference rows with a prompt may mix). Used
    by [`validate_dataset`] and, row by row, for a stream."""
    row_fmt = detect_format(row, index, dataset_name)
    if row_fmt != fmt and not (fmt in (RATED, PREFERENCE) and row_fmt in (RATED, PREFERENCE)):
        required = REQUIRED_COLUMNS[fmt]
        missing = [c for c in required if not _present(row, c)]
        if missing:
            bad, detail = missing[0], f" (missing column(s) {missing})"
        else:
            bad = "prompt" if fmt == PREFERENCE_IMPLICIT else REQUIRED_COLUMNS[row_fmt][-1]
            detail = f" (it has the '{bad}' column of the '{row_fmt}' format)"
        raise DataValidationError(
            f"this row is in the '{row_fmt}' format but row {first_row} is in the '{fmt}' format" + detail,
            "use one format for the whole dataset (convert the odd rows, or drop them); only rated rows and "
            "preference rows with a 'prompt' column can be mixed", row=index, field=bad, dataset_name=dataset_name,
        )
    validate_example(row, index, dataset_name)
    row_style = _row_style(row, fmt)
    if row_style != style:
        lead = "chosen" if fmt == PREFERENCE_IMPLICIT else "prompt"
        raise DataValidationError(
            f"mixed standard/conversational styles across rows: '{lead}' is {_style_word(row_style)} here but "
            f"{_style_word(style)} in row {first_row}", _STYLE_FIX, row=index, field=lead, dataset_name=dataset_name,
        )
    return row_fmt


def validate_dataset(dataset, dataset_name: str = "train") -> ValidationReport:
    r"""
    Validates every row of a dataset before training and summarises it.

    The format and the style (standard / conversational) are read from row 0; every row must be in the same format and
    style and pass [`validate_example`], except that rated rows and preference rows (explicit prompt) may be mixed
    (reported as `"rated+preference"`: each pair keeps one-hot targets, each rated row `softmax(rewards / alpha)`). Rows whose rewards are all equal are legal (uniform targets) but counted,
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
        `DataValidationError`: the first bad row's row, field, problem and fix, then the other bad rows (first 20).

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
    first_row = first.get(ROW_INDEX, 0)  # errors name the user's rows (`with_row_index`), else positions
    fmt = detect_format(first, first_row, dataset_name)
    style = _row_style(first, fmt)  # compared from row 1 on: row 0 is validated first, in the loop
    # Only the formats' own columns are read (a rated dataset with "chosen"/"rejected" too is still read as rated).
    if fmt == PREFERENCE_IMPLICIT:
        columns = ["chosen", "rejected", "prompt"]
    else:
        columns = list(dict.fromkeys(REQUIRED_COLUMNS[RATED] + REQUIRED_COLUMNS[PREFERENCE] + (PAIR_COLUMN,)))
    formats_seen = {fmt}

    report = ValidationReport(dataset_name=dataset_name, format=fmt, conversational=style == "conversational",
                              num_rows=0)
    k_hist: dict[int, int] = {}
    bad: list[DataValidationError] = []
    for position, row in enumerate(_iter_rows(dataset, [*columns, ROW_INDEX])):
        index = row.get(ROW_INDEX, position)
        try:
            row_fmt = check_same_layout(row, index, fmt, style, first_row, dataset_name)
        except DataValidationError as error:
            bad.append(error)
            continue
        formats_seen.add(row_fmt)
        if row_fmt == RATED:
            rewards = _as_list(row["rewards"])
            k = len(rewards)
            report.num_pairs += row.get(PAIR_COLUMN) is True
            if rewards_tie(rewards):
                report.num_all_equal_rewards += 1
                if len(report.all_equal_rows) < _MAX_REPORTED_ROWS:
                    report.all_equal_rows.append(index)
        else:
            k = 2
            report.num_pairs += 1
        k_hist[k] = k_hist.get(k, 0) + 1
        report.num_rows += 1

    if bad:  # every row was read, so that one round of fixes fixes them all
        raise DataValidationError.first_of(bad)
    report.k_histogram = dict(sorted(k_hist.items()))
    if len(formats_seen) > 1:
        report.format = MIXED
    if report.num_all_equal_rewards:  # every row: nothing ranks any completion (a reward that scored all alike?)
        every = report.num_all_equal_rewards == report.num_rows
        logger.warning(
            "%s dataset: %d of %d rows have all-equal rewards (%s); first rows: %s", dataset_name,
            report.num_all_equal_rewards, report.num_rows, "EVERY row: no reward tells any completion from another, so "
            "there is nothing to learn; check the rewards (a reward function that scored every completion alike?)"
            if every else "legal: their targets are uniform over the completions", report.all_equal_rows,
        )
    return report


# --------------------------------------------------------------------------------------------------- conversion


def to_rated(example: dict, index: int | None = None, dataset_name: str = "train") -> dict:
    r"""
    Converts a row of any accepted format to the rated format, checking what the conversion relies on.

    - rated rows pass through, with rewards checked ([`check_rewards`]) and as `float`;
    - preference rows become `{"prompt": p, "completions": [chosen, rejected], "rewards": [1.0, 0.0],
      "preference_pair": True}`: the flag keeps their targets one-hot on the chosen whatever `alpha` is (the paper's
      pairwise case), also after the conversion;
    - implicit-prompt rows are split with `trl.data_utils.extract_prompt` first (as `DPOTrainer` does), then as above.

    Only these four keys are returned (`datasets.map` keeps the other columns unless removed). Rows that already passed
    [`validate_example`] are converted without a second check by [`to_rated_unchecked`].

    Args:
        example (`dict`):
            One row.
        index (`int` or `None`, *optional*):
            Its index, for error messages (pass `with_indices=True` to `datasets.map`).
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Dataset name, for error messages.

    Returns:
        `dict`: `{"prompt", "completions", "rewards", "preference_pair"}`.

    Raises:
        `DataValidationError`: for unusable rewards, or an implicit-prompt row with no extractable prompt.

    Examples:

    ```python
    >>> to_rated({"prompt": "2+2=", "chosen": "4", "rejected": "5"})
    {'prompt': '2+2=', 'completions': ['4', '5'], 'rewards': [1.0, 0.0], 'preference_pair': True}
    >>> to_rated({"chosen": "2+2= 4", "rejected": "2+2= 5"})
    {'prompt': '2+2=', 'completions': [' 4', ' 5'], 'rewards': [1.0, 0.0], 'preference_pair': True}
    >>> to_rated({"prompt": "2+2=", "completions": ["4", "5"], "rewards": [1, 0]})
    {'prompt': '2+2=', 'completions': ['4', '5'], 'rewards': [1.0, 0.0], 'preference_pair': False}
    ```
    """
    fmt = detect_format(example, index, dataset_name)
    if fmt == RATED:
        rewards = _rewards_list(example, index, dataset_name)
        check_rewards(rewards, index, dataset_name)
        _check_pair_flag(example, _as_list(example["completions"]), rewards, index, dataset_name)
    elif fmt == PREFERENCE_IMPLICIT:
        _check_implicit(example, index, dataset_name)
    return to_rated_unchecked(example, fmt)


def to_rated_unchecked(example: dict, fmt: str | None = None) -> dict:
    """[`to_rated`] for a row that passed [`validate_example`]: nothing is checked again. Rewards become `float`
    here, the one cast on the way to the collator (tokenization passes them through). `fmt`: the row's format, or
    None (or `MIXED`) to detect it."""
    fmt = detect_format(example) if fmt in (None, MIXED) else fmt
    if fmt == RATED:
        return {
            "prompt": example["prompt"],
            "completions": list(_as_list(example["completions"])),
            "rewards": [float(r) for r in _as_list(example["rewards"])],
            PAIR_COLUMN: example.get(PAIR_COLUMN) is True,
        }
    if fmt == PREFERENCE_IMPLICIT:
        example = extract_prompt({"chosen": example["chosen"], "rejected": example["rejected"]})
    return {"prompt": example["prompt"], "completions": [example["chosen"], example["rejected"]],
            "rewards": [1.0, 0.0], PAIR_COLUMN: True}
