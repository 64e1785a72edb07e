"""[`score_rows`]: call the reward sources on {prompt, completions} rows and combine them into `rewards`.

What each source gets (TRL's `GRPOTrainer` convention, flattened over a chunk of rows): `prompts` (each row's prompt,
repeated once per completion), `completions` (one per entry), every other column of the rows repeated per completion
as a keyword argument (not `prompt`, `completions` and an earlier `rewards`), and `log_metric(name, value)` (the
values are averaged into the sidecar's `metrics`) and `log_extra(column, values)` (accepted and discarded). GRPO's
`completion_ids` and `trainer_state` do not exist here and are not passed.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from collections.abc import Mapping

from ..runtime.errors import DataError

__all__ = ["is_empty_completion", "score_rows"]

_NOT_COLUMNS = ("prompt", "completions", "rewards", "completion", "completion_ids")
#: What a reward function gets besides the rows' columns: a column of one of these names is refused
_ARGUMENTS = ("prompts", "log_metric", "log_extra")


def _log(message: str) -> None:
    print(f"[nca-trl score] {message}", flush=True)


def is_empty_completion(completion) -> bool:
    """`""`, an empty message list, or a message with empty content (and no tool calls): `nca-trl train` refuses
    them."""
    if isinstance(completion, str):
        return completion == ""
    if isinstance(completion, (list, tuple)):
        return not completion or any(
            isinstance(m, Mapping) and m.get("content") in ("", None) and not m.get("tool_calls") for m in completion
        )
    return False


def _evaluation_shape(row: dict) -> dict:
    """`row` as `validate_example` checks it for training, less what an evaluation scores: each empty completion is
    a stand-in of the prompt's style, and a row of one completion gets a second one."""
    chat = isinstance(row.get("prompt"), list)
    stand_in = [{"role": "assistant", "content": "x"}] if chat else "x"
    completions = [stand_in if is_empty_completion(c) else c for c in row["completions"]]
    completions += [stand_in] * (2 - len(completions))
    return {**row, "completions": completions, "rewards": [0.0] * len(completions)}


def _named(sources) -> dict:
    if isinstance(sources, Mapping):
        return dict(sources)
    named: dict = {}
    for source in sources:
        if isinstance(source, tuple):
            name, source = source
        else:
            name = getattr(source, "__name__", None) or type(source).__name__
        base, n = name, 1
        while name in named:
            n += 1
            name = f"{base}#{n}"
        named[name] = source
    return named


def _summary(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
    mean = math.fsum(values) / len(values)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return {"count": len(values), "mean": mean, "std": std, "min": min(values), "max": max(values)}


def _where(owners, row_ids, j) -> str:
    position, k = owners[j]
    return f"row {row_ids[position]}, completion {k}"


def _call(name: str, source, kwargs: dict, expected: int, owners, row_ids) -> list:
    """One call of a source, its return checked: `expected` values, each a real number or None, finite, within
    float32's range."""
    from ..data.formats import FLOAT32_MAX  # the largest reward training takes (it reads rewards in float32)

    try:
        inspect.signature(source).bind(**kwargs)
    except TypeError as e:
        rows = f"rows {row_ids[owners[0][0]]}-{row_ids[owners[-1][0]]}"
        raise DataError(
            f"reward source {name!r} cannot take the arguments `nca-trl score` passes ({e}; {rows}): "
            f"{', '.join(sorted(kwargs))}. Write it as `f(prompts, completions, **kwargs)`."
        ) from None
    except ValueError:  # no signature (some builtins): call it and see
        pass
    rows = f"rows {row_ids[owners[0][0]]}-{row_ids[owners[-1][0]]}"
    try:
        result = source(**kwargs)
        if inspect.isawaitable(result):  # an async reward function (GRPO accepts them too)
            result = asyncio.run(result) if inspect.iscoroutine(result) else asyncio.run(_await(result))
    except Exception as e:
        raise RuntimeError(f"reward source {name!r} failed on {rows}: {type(e).__name__}: {e}") from e
    if hasattr(result, "tolist") and not isinstance(result, (list, tuple)):
        result = result.tolist()  # a tensor or an array of rewards
    if not isinstance(result, (list, tuple)):
        raise DataError(f"reward source {name!r} returned {type(result).__name__} for {rows}, expected a list of "
                        f"{expected} rewards (float or None), one per completion.")
    if len(result) != expected:
        raise DataError(f"reward source {name!r} returned {len(result)} rewards for {rows}, expected {expected}: one "
                         "per completion, in the order of `completions`.")
    values: list = []
    for j, value in enumerate(result):
        if value is not None and not isinstance(value, (int, float)) and hasattr(value, "item"):
            try:
                value = value.item()  # numpy scalars, 0-d tensors
            except (ValueError, RuntimeError):
                pass
        if value is None:
            values.append(None)
            continue
        if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool8") or not isinstance(value,
                                                                                                   numbers.Real):
            raise DataError(f"reward source {name!r} returned {value!r} ({type(value).__name__}) for "
                            f"{_where(owners, row_ids, j)}: expected a real number or None.")
        try:
            value = float(value)
        except OverflowError:  # an int past float's range (10**400)
            value = math.inf
        if not math.isfinite(value):
            raise DataError(f"reward source {name!r} returned {value} for {_where(owners, row_ids, j)}: rewards must "
                             "be finite (return None to drop a completion).")
        if abs(value) > FLOAT32_MAX:  # training reads rewards in float32; the summary's squares overflowed
            raise DataError(f"reward source {name!r} returned {value} for {_where(owners, row_ids, j)}: rewards must "
                            f"be within float32's range (|reward| <= {FLOAT32_MAX:.4g}), as training reads them.")
        values.append(value)
    return values


async def _await(awaitable):
    return await awaitable


def _per_completion(row: dict, column: str, finished: str) -> bool:
    """Whether `column` of `row` holds one value per completion (the `finished` column, named by `finished`): it
    follows the kept completions."""
    value = row.get(column)
    return column == finished and isinstance(value, (list, tuple)) and len(value) == len(row["completions"])


def _value(row: dict, column: str, k: int, finished: str):
    """What a reward function is given of `column` for completion `k`: its own value of a per-completion column (a
    sample cut at `max_new_tokens` has `finished` False), else the row's."""
    return row[column][k] if _per_completion(row, column, finished) else row.get(column)


def score_rows(rows: list[dict], sources, weights: list[float] | None = None, *, chunk_size: int = 64,
               row_ids: list[int] | None = None, log=_log, progress: bool = True,
               evaluation: bool = False) -> tuple[list[dict], dict]:
    """Score {prompt, completions} rows: `(scored_rows, stats)`.

    Args:
        rows: dicts with `prompt` and `completions` (K strings, or K message lists); other keys are carried through
            and passed to the reward functions. An existing `rewards` is replaced.
        sources: `{name: callable}`, or a list of callables (named by `__name__`), each in GRPO's convention
            (`load_sources` builds them from specs and a reward model path).
        weights: one per source (default all 1.0): reward = sum of weight x value.
        chunk_size: rows per call of a source.
        row_ids: how errors and logs name the rows (default: their positions in `rows`).
        evaluation: score for an evaluation, not for `nca-trl train` (below).

    Empty completions are dropped before scoring; a completion that any source scores None is dropped; a row left
    with fewer than 2 completions is dropped. Each output row is checked as `nca-trl train` checks it. With
    `evaluation`, empty completions are scored like the others (an empty answer is the policy's too), and a row is
    kept while it has one scored completion; the rows are not training data then, and not checked as such.

    Returns:
        The scored rows `{"prompt", "completions", "rewards", ...carried}` and the statistics: `rows_in`,
        `rows_out`, `completions_in`, `completions_out`, `dropped` (`empty_completions`, `none_rewards`,
        `rows_fewer_than_2_completions`, `completions_in_dropped_rows`), `none_by_source`, `sources` (per source:
        weight, count, none, mean, std, min, max of its values), `rewards` (the same of the combined rewards),
        `replaced_rewards` (rows that had a `rewards` column), `metrics` (the means of `log_metric` values).
    """
    # Here, not at the top: the command's light imports do not load torch. FLOAT32_MAX: the largest reward training
    # takes (the weighted sum's bound too); FINISHED_COLUMN: generate's per-completion flags, kept with the completions
    from ..data.formats import FINISHED_COLUMN, FLOAT32_MAX
    from ..data.validation import validate_example

    sources = _named(sources)
    if not sources:
        raise ValueError("score_rows needs at least one reward source.")
    names = list(sources)
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} weight(s) for {len(names)} reward source(s) ({', '.join(names)}).")
    row_ids = list(range(len(rows))) if row_ids is None else list(row_ids)
    columns = list(dict.fromkeys(k for row in rows for k in row if k not in _NOT_COLUMNS))
    for taken in [c for c in columns if c in _ARGUMENTS]:  # a column would pass for the argument (TRL's GRPO raises)
        first = next(i for i, row in enumerate(rows) if taken in row)
        raise DataError(f"row {row_ids[first]} has a column `{taken}`, a name that the reward functions take as their "
                        f"own argument ({', '.join(_ARGUMENTS)}): rename that column (every row's); no row was scored.")
    metrics: dict[str, list[float]] = {}

    def log_metric(name, value):
        metrics.setdefault(str(name), []).append(float(value))

    def log_extra(column, values):
        return None

    dropped = {"empty_completions": 0, "none_rewards": 0, "rows_fewer_than_2_completions": 0,
               "completions_in_dropped_rows": 0}
    none_by_source = dict.fromkeys(names, 0)
    values_by_source: dict[str, list[float]] = {name: [] for name in names}
    replaced = sum(1 for row in rows if row.get("rewards") is not None)
    if replaced:
        log(f"{replaced} row(s) already have `rewards`: they are replaced by the new scores")
    scored: list[dict] = []
    completions_in = 0
    least = 1 if evaluation else 2  # completions a row keeps to be kept
    empty_unscored = 0  # evaluation: empty completions that a source scored None, so left out after all

    from tqdm.auto import tqdm

    bar = tqdm(total=len(rows), unit="row", desc="scoring", dynamic_ncols=True,
               **({} if progress else {"disable": True}))  # TQDM_DISABLE=1 in the environment also switches it off
    for start in range(0, len(rows), chunk_size):
        todo = []  # (position, [(completion index, completion)]) of the rows worth scoring
        for position in range(start, min(start + chunk_size, len(rows))):
            row = rows[position]
            for key in ("prompt", "completions"):
                if key not in row:
                    raise DataError(f"row {row_ids[position]} has no `{key}` (it has {sorted(row)}): `nca-trl score` "
                                    "needs {prompt, completions} rows, as `nca-trl generate` writes.")
            completions = row["completions"]
            if isinstance(completions, (str, bytes)) or not isinstance(completions, (list, tuple)):
                raise DataError(f"row {row_ids[position]}: `completions` is {type(completions).__name__}, expected a "
                                "list of completions.")
            completions_in += len(completions)
            kept = [(k, c) for k, c in enumerate(completions) if evaluation or not is_empty_completion(c)]
            dropped["empty_completions"] += len(completions) - len(kept)
            if len(kept) < least:
                dropped["rows_fewer_than_2_completions"] += 1
                dropped["completions_in_dropped_rows"] += len(kept)
                continue
            # The row's shape, before any model runs: as training checks it, less what an evaluation scores
            check = _evaluation_shape(row) if evaluation else {**row, "completions": [c for _, c in kept],
                                                                "rewards": [0.0] * len(kept)}
            validate_example(check, row_ids[position], "input")
            todo.append((position, kept))
        if todo:
            owners = [(position, k) for position, kept in todo for k, _ in kept]
            kwargs = {
                "prompts": [rows[position]["prompt"] for position, kept in todo for _ in kept],
                "completions": [c for _, kept in todo for _, c in kept],
                **{col: [_value(rows[position], col, k, FINISHED_COLUMN) for position, kept in todo for k, _ in kept]
                   for col in columns},
            }
            kwargs.setdefault("log_metric", log_metric)
            kwargs.setdefault("log_extra", log_extra)
            per_source = []
            for name in names:
                source = sources[name]
                call = kwargs if _takes_extras(source) else {k: v for k, v in kwargs.items()
                                                             if k not in ("log_metric", "log_extra")}
                values = _call(name, source, call, len(owners), owners, row_ids)
                none_by_source[name] += sum(v is None for v in values)
                values_by_source[name].extend(v for v in values if v is not None)
                per_source.append(values)
            j = 0
            for position, kept in todo:
                out_completions, out_rewards, out_index = [], [], []
                for k, completion in kept:
                    values = [per_source[s][j] for s in range(len(names))]
                    j += 1
                    if any(v is None for v in values):
                        dropped["none_rewards"] += 1
                        empty_unscored += evaluation and is_empty_completion(completion)
                        continue
                    reward = math.fsum(w * v for w, v in zip(weights, values))
                    if not abs(reward) <= FLOAT32_MAX:
                        raise DataError(f"the weighted reward {reward} of {_where(owners, row_ids, j - 1)} is past "
                                        f"float32's range (|reward| <= {FLOAT32_MAX:.4g}), as training reads it: "
                                        f"lower `reward_weights` ({weights}).")
                    out_completions.append(completion)
                    out_rewards.append(reward)
                    out_index.append(k)
                if len(out_completions) < least:
                    dropped["rows_fewer_than_2_completions"] += 1
                    dropped["completions_in_dropped_rows"] += len(out_completions)
                    continue
                row = rows[position]
                out = {"prompt": row["prompt"], "completions": out_completions, "rewards": out_rewards,
                       **{k: v for k, v in row.items() if k not in ("prompt", "completions", "rewards")}}
                for column in [c for c in columns if _per_completion(row, c, FINISHED_COLUMN)]:
                    out[column] = [row[column][k] for k in out_index]  # the kept completions' own
                if not evaluation:
                    validate_example(out, row_ids[position], "scored")  # what `nca-trl train` will check
                scored.append(out)
        bar.update(min(start + chunk_size, len(rows)) - start)
    bar.close()

    completions_out = sum(len(row["completions"]) for row in scored)
    stats = {
        "rows_in": len(rows),
        "rows_out": len(scored),
        "completions_in": completions_in,
        "completions_out": completions_out,
        "dropped": dropped,
        "none_by_source": none_by_source,
        "sources": {name: {"weight": w, **_summary(values_by_source[name]), "none": none_by_source[name]}
                    for name, w in zip(names, weights)},
        "rewards": _summary([r for row in scored for r in row["rewards"]]),
        "replaced_rewards": replaced,
        "evaluation": evaluation,
        "empty_scored_none": empty_unscored,
        "metrics": {name: math.fsum(v) / len(v) for name, v in metrics.items()},
    }
    _log_stats(stats, log)
    if scored and not evaluation and all(max(r["rewards"]) - min(r["rewards"]) <= 1e-12 for r in scored):
        log(f"warning: in every one of the {len(scored)} rows all completions got the same reward: `nca-trl train` "
            "has nothing to learn from them (check the reward sources: one that scores every completion alike?)")
    return scored, stats


def _log_stats(stats: dict, log) -> None:
    dropped = stats["dropped"]
    log(f"{stats['rows_out']} of {stats['rows_in']} rows kept, {stats['completions_out']} of "
        f"{stats['completions_in']} completions")
    if dropped["empty_completions"]:
        log(f"dropped {dropped['empty_completions']} empty completion(s) (`nca-trl train` refuses them)")
    if dropped["none_rewards"]:
        by = ", ".join(f"{name}: {n}" for name, n in stats["none_by_source"].items() if n)
        log(f"dropped {dropped['none_rewards']} completion(s) that a source scored None ({by})")
    if stats.get("empty_scored_none"):
        log(f"warning: {stats['empty_scored_none']} empty completion(s) scored None by a source: left out, so the "
            "mean reward leaves these empty answers out; a reward function that returns a number for an empty "
            "completion counts them")
    if dropped["rows_fewer_than_2_completions"]:
        left = "no scored completion" if stats.get("evaluation") else "fewer than 2 completions"
        log(f"dropped {dropped['rows_fewer_than_2_completions']} row(s) left with {left} (with "
            f"their {dropped['completions_in_dropped_rows']} other completion(s))")
    for name, s in stats["sources"].items():
        if s["count"]:
            log(f"{name} (weight {s['weight']:g}): mean {s['mean']:.4g}, std {s['std']:.4g}, min {s['min']:.4g}, "
                f"max {s['max']:.4g} over {s['count']} completions")


def _takes_extras(source) -> bool:
    """Whether a source accepts `log_metric` / `log_extra` (a `**kwargs` or parameters of those names)."""
    try:
        parameters = inspect.signature(source).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind is p.VAR_KEYWORD or p.name in ("log_metric", "log_extra") for p in parameters)
