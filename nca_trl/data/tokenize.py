"""Turn a rated-completions (or TRL preference) dataset into `prompt_ids`, `completion_ids` (K lists) and `rewards`.

The prompt is tokenized once and each completion after it exactly the way `trl.DPOTrainer` tokenizes a chosen /
rejected pair: EOS appended to standard completions, the chat template applied to conversational ones, and the
completion starting where the tokenized prompt and prompt+completion diverge (`trl.data_utils.common_prefix_length`).

Rows are validated once, before tokenization (`nca_trl.data.validation`); tokenization trusts them and passes the
rewards through untouched.
"""

from __future__ import annotations

import logging
import statistics

from datasets import Dataset, IterableDataset
from trl.data_utils import _tokenize, common_prefix_length, is_conversational
from trl.trainer.utils import global_then_local_main_first

from ..runtime.errors import DataError, ROW_INDEX, SettingsError
from .formats import (FINISHED_COLUMN, PAIR_COLUMN, DataValidationError, _as_list, _is_bool, _kind, _row_style, _short,
                      detect_format)
from .rewards import check_rewards, rewards_tie
from .template import apply_chat_template, template_kwargs
from .validation import _check_pair_flag, check_same_layout, to_rated_unchecked, validate_dataset

logger = logging.getLogger("nca_trl")

__all__ = ["prepare_rated_dataset", "prompt_length_error", "refuse_images", "select_completions",
           "tokenize_rated_example", "with_row_index"]

_warned = {"boundary": False, "cut": False}  # warnings shown once per process, like TRL's `warning_once`


def prompt_length_error(dataset_name: str, lengths: list[int], max_length: int, shortest_row: int | None = None):
    """The error for a dataset whose every prompt fills `max_length` (`lengths`: each row's prompt length in tokens):
    a `SettingsError` (a `ValueError`), `max_length` refused, one line on the command line. Raised by
    `prepare_rated_dataset`."""
    shortest = min(lengths)
    where = f" (row {shortest_row})" if shortest_row is not None else ""
    return SettingsError(
        f"{dataset_name} dataset: every one of its {len(lengths)} rows would be dropped, since each prompt alone fills "
        f"max_length={max_length} tokens and leaves no room for a completion. Prompt lengths: shortest "
        f"{shortest}{where}, median {int(statistics.median(lengths))}, longest {max(lengths)} tokens. Fix: raise "
        f"`max_length` above {shortest} (prompt plus completion tokens; rows whose prompt is still longer are "
        "dropped with a warning), shorten the prompts, or set `truncation_mode: keep_end`."
    )


def refuse_images(dataset, name: str, trainer: str = "nca-trl's trainer", first: dict | None = None) -> None:
    """Raise a `ValueError` if `dataset` has an `image` or `images` column (the trainers are text-only): at
    construction (DPOTrainer skips preparing a vision train dataset) and in every preparation (`evaluate`, `predict`).
    `first`: its first row, where the caller has read it already."""
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # an IterableDataset of unknown features: look at its first row
        columns = list((next(iter(dataset), {}) if first is None else first).keys())
    found = [c for c in ("image", "images") if c in columns]
    if found:
        raise ValueError(  # TRL's words first (DPOTrainer refuses images for a text-only model), then ours
            f"The dataset appears to be vision-related (contains 'image' or 'images' keys): the {name} dataset has the "
            f"column {found[0]!r}, and {trainer} trains text-only models on rated text completions, "
            "so it does not support vision datasets. Remove the column (and any image placeholders in the prompts) "
            "or use `trl.DPOTrainer` with a vision-language model."
        )

def with_row_index(dataset):
    """`dataset` with a `ROW_INDEX` column: each row's position in the dataset given to the trainer (kept through
    preparation, which may drop rows, so that errors name the user's rows). A dataset that has one keeps it."""
    columns = getattr(dataset, "column_names", None)
    if dataset is None or (columns is not None and ROW_INDEX in columns):
        return dataset
    if isinstance(dataset, Dataset):  # map-style: an added in-memory column, no copy of the data
        import numpy as np
        from datasets.fingerprint import Hasher

        fingerprint = Hasher.hash((dataset._fingerprint, "nca-trl", ROW_INDEX))
        return dataset.add_column(ROW_INDEX, np.arange(len(dataset)), new_fingerprint=fingerprint)
    return dataset.map(_index_row, with_indices=True)  # a stream: counted as it is read


def _index_row(_, index):
    return {ROW_INDEX: index}


def select_completions(rewards: list[float], max_completions: int | None) -> list[int]:
    """Indices of the completions kept under a cap of `max_completions`, in their original order.

    Keeps the best and the worst completion and an even spread of reward ranks between them (ties ranked by
    position).

    Example:
    ```python
    >>> select_completions([1.0, 5.0, 3.0, 4.0, 2.0], 3)  # ranks: 1 (5.0), 3 (3.0), 5 (1.0)
    [0, 1, 2]
    ```
    """
    k = len(rewards)
    if max_completions is None or k <= max_completions:
        return list(range(k))
    by_rank = sorted(range(k), key=lambda i: (-rewards[i], i))
    ranks = [round(j * (k - 1) / (max_completions - 1)) for j in range(max_completions)]
    return sorted(by_rank[r] for r in ranks)


def tokenize_rated_example(example: dict, processing_class, eos_token: str, row=None,
                           dataset_name: str = "train") -> dict:
    """Tokenize one rated example into `prompt_ids`, `completion_ids` (one list per completion) and `rewards`.

    The row is trusted (validated before, see `prepare_rated_dataset`): its rewards are passed through as they are;
    the collator turns them into the training tensor. What only the tokenizer can check is checked here, naming `row`:
    its `tools` and `chat_template_kwargs`, and that the chat template renders it (`nca_trl.data.template`).
    """
    return _tokenize_rated(example, processing_class, eos_token, row, dataset_name)[0]


def _tokenize_rated(example: dict, processing_class, eos_token: str, row=None,
                    dataset_name: str = "train") -> tuple[dict, str]:
    """`tokenize_rated_example`, and the end of the prompt left out of the training sequences ("" if none)."""
    prompt, completions = example["prompt"], example["completions"]
    finished = _finished(example, len(completions), row, dataset_name)
    if is_conversational({"prompt": prompt}):
        kwargs = {**template_kwargs(example, row, dataset_name), "row": row, "dataset_name": dataset_name}
        prompt_ids = apply_chat_template(processing_class, prompt, "the prompt", "prompt", add_generation_prompt=True,
                                         **kwargs)
        # An unfinished sample's turn is left open (`continue_final_message`): no end of turn it never produced
        full_ids = [apply_chat_template(processing_class, prompt + c, f"prompt + completion {i}", "completions",
                                        **kwargs, **({} if done else {"continue_final_message": True}))
                    for i, (c, done) in enumerate(zip(completions, finished))]
    else:
        completions = [c if c.endswith(eos_token) or not done else c + eos_token
                       for c, done in zip(completions, finished)]
        prompt_ids = _tokenize(processing_class, prompt)["input_ids"]
        full_ids = [_tokenize(processing_class, prompt + c)["input_ids"] for c in completions]

    # The completion starts where the tokenized prompt and prompt+completion diverge, which is not always after the
    # prompt (a chat template that renders the prompt alone differently, or tokens merging across the boundary)
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full_ids)
    trimmed = _shown(processing_class, prompt_ids[prompt_len:]) if prompt_len < len(prompt_ids) else ""
    out = {
        "prompt_ids": prompt_ids[:prompt_len],
        "completion_ids": [ids[prompt_len:] for ids in full_ids],
        "rewards": list(example["rewards"]),
    }
    return out, trimmed


def _shown(processing_class, ids: list[int]) -> str:
    """Token ids as text for a message: decoded, or their token strings where that decodes to nothing (a lone
    SentencePiece "▁" left out of the prompt)."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    return tokenizer.decode(ids) or "".join(tokenizer.convert_ids_to_tokens(ids))


def _finished(example: dict, k: int, row, dataset_name: str) -> list[bool]:
    """The row's `finished` column (one bool per completion; all True when absent or None), checked."""
    finished = example.get(FINISHED_COLUMN)
    if finished is None:
        return [True] * k
    finished = _as_list(finished)
    if not (isinstance(finished, (list, tuple)) and len(finished) == k and all(map(_is_bool, finished))):
        raise DataValidationError(
            f"'{FINISHED_COLUMN}' is {_short(finished)}, expected one true/false per completion ({k})",
            f"give '{FINISHED_COLUMN}' a list of {k} booleans (false: the sample was cut at max_new_tokens and is "
            "trained without EOS), or drop the column",
            row=row, field=FINISHED_COLUMN, dataset_name=dataset_name)
    return list(finished)


_BOUNDARY = (
    "the tokenized prompt is not a prefix of the tokenized prompt+completion (tokens merge across the boundary, or "
    "the chat template renders the prompt alone differently): as in trl.DPOTrainer, the completion starts where they "
    "diverge, and that end of the prompt is left out of the training sequence"
)


def prepare_rated_dataset(
    dataset: Dataset | IterableDataset,
    processing_class,
    args,
    dataset_name: str,
    max_completions: int | None = None,
    stats: dict | None = None,
) -> Dataset | IterableDataset:
    """Validate, convert to rated completions, drop tied prompts if `args.ties == "drop"`, cap K, tokenize and drop
    rows with no room for a completion.

    Each row is validated once, up front (every row of a `Dataset`; each row of a stream as it is read), and trusted
    from then on.

    A dataset that arrives tokenized (a `completion_ids` column: prepared before, e.g. another trainer's
    `train_dataset`) is taken as tokenized by `processing_class`: each row is checked as token ids (K >= 2, a token in
    each completion, one finite reward per completion), then `ties`, `max_completions` and the `max_length` drop
    apply to it as to raw rows. Preparing a prepared dataset again with the same settings changes nothing.

    Args:
        dataset: rated completions or TRL preference data (explicit or implicit prompt, standard or conversational).
        processing_class: the tokenizer.
        args: a `DPOConfig` (reads `max_length`, `truncation_mode`, `dataset_num_proc`).
        dataset_name: used in messages ("train", "eval", ...).
        max_completions: optional cap on K per prompt (see `select_completions`).
        stats: if given, filled with what was dropped: `ties_dropped` (prompts whose rewards all tie, with
            `ties="drop"`; None for a stream, which cannot be counted) and `too_long_dropped`, and with
            `cut_completions`: the completions whose prompt + completion `max_length` cuts (not for a stream).

    A `finished` column (one bool per completion, as `nca-trl generate` writes it) gives a completion marked False,
    a sample cut at `max_new_tokens`, no EOS (a conversational one no end of turn): it is trained as it was sampled.
    """
    first = next(iter(dataset))
    refuse_images(dataset, dataset_name, first=first)
    # The global main process maps (and caches) first, then each node's main, then the others read the cache
    with global_then_local_main_first():
        return _prepare(dataset, first, processing_class, args, dataset_name, max_completions,
                        stats if stats is not None else {})


def _row_names(dataset) -> list[int]:
    """How messages name the rows of a map-style `dataset`: their `row_index` (`with_row_index`: the position in the
    data as given), else their positions."""
    return list(dataset[ROW_INDEX]) if ROW_INDEX in dataset.column_names else list(range(len(dataset)))


def _all_tied_error(dataset_name, rows):
    return DataError(f"{dataset_name} dataset: the rewards of every one of its {rows} prompts tie, and `ties='drop'` "
                      "drops them all: nothing to train on. Use `ties='keep'`, or rate the completions apart.")


def _drop_ties(dataset, args, dataset_name, stats, counts):
    ties = getattr(args, "ties", "keep") or "keep"
    stats["ties_dropped"] = 0
    if ties != "drop":
        return dataset
    if not isinstance(dataset, Dataset):
        stats["ties_dropped"] = None
        logger.warning("%s dataset is streamed: prompts whose rewards all tie are dropped as they come (ties='drop'), "
                       "without a count.", dataset_name)
        def untied(example):
            tie = rewards_tie(example["rewards"])
            counts["tied"] += tie
            return not tie

        return dataset.filter(untied)
    tied = [i for i, rewards in enumerate(dataset["rewards"]) if rewards_tie(rewards)]
    stats["ties_dropped"] = len(tied)
    if tied:
        if len(tied) == len(dataset):
            raise _all_tied_error(dataset_name, len(dataset))
        names = _row_names(dataset)
        logger.warning("%s dataset: dropped %d of %d prompts whose rewards all tie (ties='drop'; rows %s%s).",
                       dataset_name, len(tied), len(dataset), ", ".join(str(names[i]) for i in tied[:10]),
                       ", ..." if len(tied) > 10 else "")
        dropped = set(tied)
        dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
    return dataset


# The columns that hold one value per completion, raw or tokenized: what `max_completions` selects from
_PER_COMPLETION = ("completions", "completion_ids", "rewards", "ref_logps", FINISHED_COLUMN)
_TOKENIZED_FIX = ("give the raw rows (prompt, completions, rewards) and let the trainer tokenize them, or fix the "
                  "tokenized row")


def _check_tokenized_row(example, row, dataset_name):
    """The checks of a raw row (`nca_trl.data.validation`) that still apply to a row of token ids."""
    def refuse(problem, field, fix=_TOKENIZED_FIX):
        raise DataValidationError(f"(a tokenized row) {problem}", fix, row=row, field=field, dataset_name=dataset_name)

    for name in ("prompt_ids", "rewards"):
        if example.get(name) is None:
            refuse(f"'{name}' is missing beside 'completion_ids'", name)
    prompt_ids, completions = _as_list(example["prompt_ids"]), _as_list(example["completion_ids"])
    rewards = _as_list(example["rewards"])
    if not _token_ids(prompt_ids):
        refuse(f"'prompt_ids' is {_kind(prompt_ids)}, expected a list of token ids", "prompt_ids")
    if not isinstance(completions, (list, tuple)) or len(completions) < 2:
        refuse(f"{len(completions) if isinstance(completions, (list, tuple)) else _kind(completions)} completion(s); "
               "NCA/InfoNCA need K >= 2 completions per prompt", "completion_ids")
    for i, ids in enumerate(map(_as_list, completions)):
        if not _token_ids(ids) or not ids:
            refuse(f"completion {i} is {_kind(ids) if not _token_ids(ids) else 'empty'}, expected its token ids",
                   "completion_ids")
    if not isinstance(rewards, (list, tuple)) or len(rewards) != len(completions):
        refuse(f"{len(completions)} completions but rewards {_short(rewards)}", "rewards",
               "give exactly one reward per completion, in the same order")
    check_rewards(rewards, row, dataset_name)
    ref = example.get("ref_logps")
    if ref is not None and len(_as_list(ref)) != len(completions):
        refuse(f"{len(completions)} completions but {len(ref)} reference log-probs ('ref_logps')", "ref_logps",
               "remove the 'ref_logps' column: the trainer computes it (precompute_ref_log_probs)")
    _check_pair_flag(example, completions, rewards, row, dataset_name)


def _token_ids(value) -> bool:
    """A list of token ids (its first element read: a dataset's list column holds one type)."""
    return isinstance(value, (list, tuple)) and (not value or (isinstance(value[0], int) and not _is_bool(value[0])))


def _check_tokenized(dataset, dataset_name, counts):
    """A tokenized dataset with every row checked (`_check_tokenized_row`): a `Dataset` now, a stream as it is read.
    A format set on it (`torch`, `numpy`) is reset: the collator reads Python values, as preparation writes them."""
    dataset = dataset.with_format(None)
    if isinstance(dataset, Dataset):
        read = [c for c in ("prompt_ids", "completion_ids", "rewards", "ref_logps", PAIR_COLUMN)
                if c in dataset.column_names]
        for i, example in zip(_row_names(dataset), dataset.select_columns(read)):
            _check_tokenized_row(example, i, dataset_name)
        return dataset

    def checked(example, index):
        counts["rows"] += 1
        _check_tokenized_row(example, example.get(ROW_INDEX, index), dataset_name)
        return example

    return dataset.map(checked, with_indices=True)

def _prepare(dataset, first, processing_class, args, dataset_name, max_completions, stats):
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}
    columns = list(first.keys())
    counts = {"rows": 0, "tied": 0, "lengths": []}  # a stream's: what a pass read and dropped (`_check_kept`)
    tokenized = "completion_ids" in columns

    preference_columns = [c for c in ("chosen", "rejected") if c in columns]
    if tokenized:
        dataset = _check_tokenized(dataset, dataset_name, counts)
    elif isinstance(dataset, Dataset):
        report = validate_dataset(dataset, dataset_name)
        logger.info(report.summary())
        dataset = dataset.map(
            to_rated_unchecked, fn_kwargs={"fmt": report.format}, remove_columns=preference_columns, **map_kwargs
        )
    else:  # a stream is read as it trains: each row validated as it is converted, against the first row's layout
        layout = {}

        def validated(example, index):
            row = example.get(ROW_INDEX, index)
            if not layout:  # the first row read sets the layout (and is validated below, as every row)
                fmt = detect_format(example, row, dataset_name)
                layout.update(fmt=fmt, style=_row_style(example, fmt), row=row)
            row_fmt = check_same_layout(example, row, layout["fmt"], layout["style"], layout["row"], dataset_name)
            counts["rows"] += 1
            return to_rated_unchecked(example, row_fmt)

        dataset = dataset.map(validated, with_indices=True, remove_columns=preference_columns)
    dataset = _drop_ties(dataset, args, dataset_name, stats, counts)

    if max_completions is not None:

        def cap(example):
            keep = select_completions(example["rewards"], max_completions)
            return {name: [example[name][i] for i in keep]
                    for name in _PER_COMPLETION if example.get(name) is not None}

        capped = [i for i, rewards in enumerate(dataset["rewards"]) if len(rewards) > max_completions] \
            if isinstance(dataset, Dataset) else None  # a stream: each row as it is read
        if capped:
            names = _row_names(dataset)
            logger.warning(
                "%s dataset: %d of %d prompts have more than max_completions=%d completions and keep the best, the "
                "worst and an even spread of ranks between (rows %s%s).", dataset_name, len(capped), len(dataset),
                max_completions, ", ".join(str(names[i]) for i in capped[:10]), ", ..." if len(capped) > 10 else "")
        if capped is None or capped:  # a dataset prepared before is not rewritten when nothing is capped
            dataset = dataset.map(cap, **map_kwargs)

    streamed = not isinstance(dataset, Dataset)
    # A stream's cut is said as it is read; the closure holds no more (`datasets` fingerprints a map by its function)
    cut_at, cut_message = (args.max_length, _cut_message(args)) if streamed and args.max_length else (None, None)

    def tokenize(example, index):
        out, trimmed = _tokenize_rated(example, processing_class, tokenizer.eos_token,
                                       example.get(ROW_INDEX, index), dataset_name)
        if streamed:  # a stream cannot be counted: say it at the first row it happens to, once per process
            if trimmed and not _warned["boundary"]:
                _warned["boundary"] = True
                logger.warning("%s dataset, row %d: %s (here %r). Shown once; it may apply to other rows.",
                               dataset_name, example.get(ROW_INDEX, index), _BOUNDARY, trimmed)
            if not _warned["cut"] and _is_cut(out["prompt_ids"], out["completion_ids"], cut_at):
                _warned["cut"] = True
                logger.warning("%s dataset, row %d: %s. Shown once; it may apply to other rows.", dataset_name,
                               example.get(ROW_INDEX, index), cut_message)
        else:
            out["prompt_trimmed"] = trimmed
        for position, ids in enumerate(out["completion_ids"]):
            if not ids:
                raise DataValidationError(
                    f"completion {position} has no token once tokenized after the prompt",
                    "check that the completion is not empty and does not merge into the prompt",
                    row=example.get(ROW_INDEX, index), field="completions", dataset_name=dataset_name,
                )
        return out

    if not tokenized:
        dataset = dataset.map(tokenize, with_indices=True, fn_kwargs={}, **map_kwargs)
    if not (streamed or tokenized):  # one message per dataset, with the number of rows it applies to
        trimmed = [(name, t) for name, t in zip(_row_names(dataset), dataset["prompt_trimmed"]) if t]
        if trimmed:
            logger.warning("%s dataset: %d of %d rows: %s (e.g. row %d: %r).",
                           dataset_name, len(trimmed), len(dataset), _BOUNDARY, *trimmed[0])
        dataset = dataset.remove_columns("prompt_trimmed")

    # With `keep_start`, a prompt that fills `max_length` leaves no completion token: no learning signal. Such rows are
    # dropped, counted and reported (`keep_end` keeps the end of each sequence, so every completion keeps tokens).
    if args.max_length is not None and args.truncation_mode == "keep_start" and isinstance(dataset, Dataset):
        lengths = [len(ids) for ids in dataset["prompt_ids"]]
        too_long = [i for i, n in enumerate(lengths) if n >= args.max_length]
        names = _row_names(dataset) if too_long else None  # how the messages name the rows
        if lengths and len(too_long) == len(lengths):
            raise prompt_length_error(dataset_name, lengths, args.max_length,
                                      shortest_row=names[lengths.index(min(lengths))])
        if too_long:
            logger.warning(
                "%s dataset: dropped %d of %d rows whose prompt alone fills max_length=%d, leaving no completion token "
                "(rows %s%s). Raise `max_length` or shorten these prompts to keep them.",
                dataset_name, len(too_long), len(lengths), args.max_length,
                ", ".join(str(names[i]) for i in too_long[:10]), ", ..." if len(too_long) > 10 else "",
            )
            dropped = set(too_long)
            dataset = dataset.select([i for i in range(len(lengths)) if i not in dropped])
        stats["too_long_dropped"] = len(too_long)
    if args.max_length is not None and isinstance(dataset, Dataset):
        _report_cut(dataset, args, dataset_name, stats)
    if args.max_length is not None and args.truncation_mode == "keep_start" and not isinstance(dataset, Dataset):
        def room(example):
            fits = len(example["prompt_ids"]) < args.max_length
            if not fits and counts.get("peek"):
                counts["lengths"].append((len(example["prompt_ids"]), example.get(ROW_INDEX)))
            return fits

        dataset = dataset.filter(room)
        counts["filters"] = True
        logger.warning(
            "%s dataset is streamed: rows whose prompt alone fills max_length=%d are dropped as they come, "
            "without a count.", dataset_name, args.max_length,
        )
    if streamed and (counts.get("filters") or getattr(args, "ties", "keep") == "drop"):
        _check_kept(dataset, counts, args, dataset_name)
    return dataset


def _is_cut(prompt_ids: list, completion_ids: list, max_length: int | None) -> bool:
    """Whether `max_length` cuts one of a row's prompt + completion sequences (a stream's row, as it is read)."""
    return max_length is not None and any(len(prompt_ids) + len(ids) > max_length for ids in completion_ids)


def _cut_message(args) -> str:
    cut = ("their ends, EOS included, are not trained (truncation_mode=keep_start)" if args.truncation_mode ==
           "keep_start" else "the start of the prompt is not seen (truncation_mode=keep_end)")
    return (f"prompt + completion longer than max_length={args.max_length} tokens is cut when batched, as "
            f"trl.DPOTrainer cuts it: {cut}. Raise `max_length` to train them whole")


def _report_cut(dataset, args, dataset_name, stats) -> None:
    """Count the sequences that the collator will cut at `max_length`, and say it once (`stats["cut_completions"]`).
    On the Arrow columns: no token id becomes a Python object."""
    import pyarrow.compute as pc

    table = dataset.select_columns(["prompt_ids", "completion_ids"]).with_format("arrow")[:]
    completions = table["completion_ids"].combine_chunks()
    rows = pc.list_parent_indices(completions)  # each completion's row
    lengths = pc.add(pc.take(pc.list_value_length(table["prompt_ids"].combine_chunks()), rows),
                     pc.list_value_length(pc.list_flatten(completions)))
    cut = pc.greater(lengths, args.max_length)
    stats["cut_completions"] = count = pc.sum(cut).as_py() or 0
    if count:
        names, cut_rows = _row_names(dataset), pc.unique(pc.filter(rows, cut)).to_pylist()
        logger.warning("%s dataset: %d of %d completions (in %d of %d rows; the longest %d tokens): %s (rows %s%s).",
                       dataset_name, count, len(lengths), len(cut_rows), len(dataset), pc.max(lengths).as_py(),
                       _cut_message(args), ", ".join(str(names[i]) for i in cut_rows[:10]),
                       ", ..." if len(cut_rows) > 10 else "")


def _check_kept(dataset, counts, args, dataset_name):
    """A stream's rows are dropped as they come (tied rewards with `ties='drop'`, prompts filling `max_length`): read
    it up to its first kept row now (those rows are read again in training), so that one that keeps none is refused
    with the error of a map-style dataset rather than trained for 0 steps."""
    counts.update(rows=0, tied=0, lengths=[], peek=True)
    kept = next(iter(dataset), None) is not None
    counts["peek"] = False
    if kept:
        counts["lengths"] = []
        return
    if counts["rows"] and counts["tied"] == counts["rows"]:
        raise _all_tied_error(dataset_name, counts["rows"])
    if counts["lengths"]:
        lengths = [n for n, _ in counts["lengths"]]
        raise prompt_length_error(dataset_name, lengths, args.max_length, shortest_row=min(counts["lengths"])[1])
