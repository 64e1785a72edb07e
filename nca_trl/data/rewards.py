# Copyright 2025 The nca-trl authors. Licensed under the Apache License, Version 2.0.
"""The one check of a reward, [`check_rewards`], used by validation (`nca_trl.data.validation`) and the converters,
and the one test of a prompt whose rewards all tie, [`rewards_tie`].

The rule: every reward is a finite `int` or `float` (not a `bool`); strings are refused, numeric ones such as `"4.5"`
included, so cast such a column first, e.g. `ds.map(lambda r: {"rewards": [float(x) for x in r["rewards"]]})`
(the UltraFeedback converter is the one deliberate exception: it parses that dataset's raw text ratings such as
`"4"`); and a row's rewards differ by at most float32's maximum (about 3.4e38), because the collator subtracts each
prompt's best reward in float64 and then works in float32. Adding a constant to a prompt's rewards changes nothing.
"""

from __future__ import annotations

import decimal
import math
import numbers
from typing import Any

from .formats import FLOAT32_MAX, REWARD_RULE, DataValidationError, _is_bool, _kind, _short


__all__ = ["check_rewards", "rewards_tie"]


def _reward_problem(value: Any, field: str) -> tuple[str, str] | None:
    """`(why value is not a usable reward, the fix)`, or `None` when it is a finite int, float or Decimal (not a
    bool)."""
    finite_fix = "give every completion a finite number (or drop the row)"
    if value is None:
        return "is None", finite_fix
    if _is_bool(value):
        return f"is the boolean {value!r}, not a number", finite_fix
    if isinstance(value, str):
        example = ('{"rewards": [float(x) for x in r["rewards"]]}' if field == "rewards"
                   else f'{{"{field}": float(r["{field}"])}}')
        return (
            f"is the string {_short(value)}, not a number; {REWARD_RULE}",
            f"cast the '{field}' column to numbers before training, e.g. `dataset.map(lambda r: {example})` "
            f"(or drop the row)",
        )
    if not isinstance(value, (numbers.Real, decimal.Decimal)):  # a Parquet decimal128 column reads as Decimal
        return f"is {_kind(value)}, not a number", finite_fix
    try:
        value = float(value)
    except OverflowError:  # an int past float64's range, e.g. 10**400
        return "is a number beyond float64's range (about 1.8e308)", "rescale the rewards (or drop the row)"
    if math.isnan(value):
        return "is NaN", finite_fix
    if math.isinf(value):
        return f"is {'+' if value > 0 else '-'}inf", finite_fix
    return None


TIE_SPREAD = 1e-12


def rewards_tie(rewards) -> bool:
    """Whether a prompt's rewards all tie: their spread (highest minus lowest, in float64) is at most `TIE_SPREAD`
    (1e-12). Such a prompt carries no preference. Validation counts these rows, `ties: drop` leaves them out, and the
    DPO baseline of `nca-trl iterate` has no pair for them (NCA / InfoNCA targets are uniform).

    An absolute spread, not a relative tolerance: adding a constant to the rewards leaves it as it is (a relative
    tolerance called `[1e9, 1e9 + 1]` a tie, so `ties: drop` dropped real preferences), while float rounding such as
    `0.3` vs `0.1 + 0.2` is still a tie; a spread of 1e-12 moves the targets `softmax(r / alpha)` by about 1e-12 / alpha
    from uniform.

    Example:
    ```python
    >>> rewards_tie([0.3, 0.1 + 0.2]), rewards_tie([1e9, 1e9 + 1])
    (True, False)
    ```
    """
    values = [float(r) for r in rewards]
    return max(values) - min(values) <= TIE_SPREAD


def check_rewards(
    rewards: list,
    row: int | None = None,
    dataset_name: str = "train",
    *,
    fields: list[str] | None = None,
    names: list[str] | None = None,
) -> None:
    r"""
    The one check of a row's rewards: each is a finite `int` or `float` (not a `bool`, not a string: numeric strings
    such as `"4.5"` are refused too), and they differ by at most float32's maximum (about 3.4e38).

    The collator subtracts each prompt's best reward in float64 before casting to float32, so adding a constant to a
    prompt's rewards changes nothing however large the constant; what must fit in float32 is the differences.

    Args:
        rewards (`list`):
            The row's rewards, one per completion.
        row (`int` or `None`, *optional*):
            Row index, for the error message.
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Dataset name, for the error message.
        fields (`list[str]`, *optional*):
            The column each reward comes from (default: `"rewards"` for all), e.g. the score columns of
            [`columns_to_rated`].
        names (`list[str]`, *optional*):
            How each reward is named in the message (default: `"reward at position i"`).

    Raises:
        `DataValidationError`: naming the row, the field, the problem and the fix.

    Examples:

    ```python
    >>> check_rewards([7.5, 3, -1.0], row=0)
    >>> check_rewards([7.5, "3"], row=4)
    Traceback (most recent call last):
    ...
    DataValidationError: train dataset, row 4, field 'rewards': reward at position 1 is the string '3', not a number; numeric strings are not accepted: every reward must be a finite int or float (not a bool). Fix: cast the 'rewards' column to numbers before training, e.g. `dataset.map(lambda r: {"rewards": [float(x) for x in r["rewards"]]})` (or drop the row).
    ```
    """
    fields = fields or ["rewards"] * len(rewards)
    names = names or [f"reward at position {i}" for i in range(len(rewards))]
    for value, field, name in zip(rewards, fields, names):
        problem = _reward_problem(value, field)
        if problem:
            raise DataValidationError(f"{name} {problem[0]}", problem[1], row=row, field=field,
                                      dataset_name=dataset_name)
    if len(rewards) < 2:
        return
    values = [float(r) for r in rewards]
    low = min(range(len(values)), key=values.__getitem__)
    high = max(range(len(values)), key=values.__getitem__)
    if values[high] - values[low] > FLOAT32_MAX:  # inf when the difference overflows float64 too
        raise DataValidationError(
            f"{names[high]} ({values[high]:.3g}) and {names[low]} ({values[low]:.3g}) differ by more than float32's "
            f"maximum ({FLOAT32_MAX:.3g}): once the prompt's best reward is subtracted, rewards are used in float32",
            "rescale the rewards, e.g. divide them all by a constant c and pass alpha / c (targets softmax(r / alpha) "
            "stay the same)",
            row=row, field=fields[low], dataset_name=dataset_name,
        )
