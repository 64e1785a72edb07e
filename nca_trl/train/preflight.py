"""Checks that `nca-trl train` runs after loading the data and before loading any model: what would otherwise fail
only once the model is loaded.

- `check_not_empty`: a dataset left with no row after conversion (e.g. UltraFeedback rows whose ratings are all
  unusable are dropped) would fail in the trainer with a bare `StopIteration`, after the model is loaded.
- `check_max_length`: with `truncation_mode="keep_start"`, a row whose prompt alone fills `max_length` leaves no
  completion token and is dropped at tokenization (`nca_trl.data.tokenize`). If every row of a dataset would be
  dropped, training cannot start (today: a torch sampler error, `num_samples=0`, after the model is loaded). The check
  loads the tokenizer only (`AutoProcessor`, as the trainer does), tokenizes rows exactly as the trainer will
  (`tokenize_rated_example`) and stops at the first row that fits, so it usually reads one row; when none fits it has
  read them all and names the shortest prompt length.

The config checks (batch sizes, fp16 / bf16 on this device) run when the config is built, in
`nca_trl.config`.
"""

from __future__ import annotations

import statistics

__all__ = ["check_before_training", "check_max_length", "check_not_empty", "prompt_length_error"]


def check_not_empty(dataset, dataset_name: str = "train") -> None:
    """Raise a `ValueError` if `dataset` (a `datasets.Dataset`, or None) has no row."""
    if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(
            f"The {dataset_name} dataset has no row left after loading and conversion (a converter drops rows it "
            "cannot use, e.g. UltraFeedback rows with fewer than 2 usable ratings: see the warning above). Fix: check "
            "`dataset_name`, `dataset_format`, `dataset_format_kwargs` and the split."
        )


def prompt_length_error(dataset_name: str, lengths: list[int], max_length: int, shortest_row: int | None = None):
    """The `ValueError` for a dataset whose every prompt fills `max_length` (`lengths`: each row's prompt length in
    tokens). Shared by the preflight and the trainer's tokenization, so both say the same thing."""
    shortest = min(lengths)
    where = f" (row {shortest_row})" if shortest_row is not None else ""
    return ValueError(
        f"{dataset_name} dataset: every one of its {len(lengths)} rows would be dropped, since each prompt alone fills "
        f"max_length={max_length} tokens and leaves no room for a completion. Prompt lengths: shortest "
        f"{shortest}{where}, median {int(statistics.median(lengths))}, longest {max(lengths)} tokens. Fix: raise "
        f"`max_length` above {shortest} (prompt plus completion tokens; rows whose prompt is still longer are "
        "dropped with a warning), shorten the prompts, or set `truncation_mode: keep_end`."
    )


def check_max_length(dataset, processing_class, args, dataset_name: str = "train") -> None:
    """Raise `prompt_length_error` if no row of `dataset` leaves room for a completion under `args.max_length`.

    Rows are validated (`validate_example`), capped to `max_completions` and tokenized exactly as the trainer does, one
    at a time, until one fits. Nothing to check without `max_length`, with `truncation_mode="keep_end"` (every
    sequence keeps its end), or for an empty dataset (the trainer reports that).
    """
    if dataset is None or args.max_length is None or args.truncation_mode != "keep_start":
        return
    from ..data.tokenize import select_completions, tokenize_rated_example
    from ..data.validation import to_rated_unchecked, validate_example

    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    max_completions = getattr(args, "max_completions", None)
    lengths = []
    for index, row in enumerate(dataset):
        if "prompt_ids" in row:  # already tokenized
            length = len(row["prompt_ids"])
        else:
            validate_example(row, index, dataset_name)
            example = {**row, **to_rated_unchecked(row)}
            keep = select_completions(example["rewards"], max_completions)
            example["completions"] = [example["completions"][i] for i in keep]
            example["rewards"] = [example["rewards"][i] for i in keep]
            length = len(tokenize_rated_example(example, processing_class, tokenizer.eos_token)["prompt_ids"])
        if length < args.max_length:
            return
        lengths.append(length)
    if lengths:
        raise prompt_length_error(dataset_name, lengths, args.max_length, shortest_row=lengths.index(min(lengths)))


def check_before_training(args, train_dataset, eval_dataset) -> None:
    """`nca-trl train`'s checks between loading the data and building the trainer (`args`: the parsed `TrainArgs`;
    `eval_dataset`: None, a dataset or a dict of them). Loads the tokenizer only."""
    training = args.training
    eval_sets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
    names = {name: name if name == "eval" else f"eval ({name!r})" for name in eval_sets}
    check_not_empty(train_dataset, "train")
    for name, dataset in eval_sets.items():
        check_not_empty(dataset, names[name])
    if training.max_length is None or training.truncation_mode != "keep_start":
        return
    from transformers import AutoProcessor

    processing_class = AutoProcessor.from_pretrained(
        args.model.model_name_or_path,
        revision=(training.model_init_kwargs or {}).get("revision"),
        trust_remote_code=training.trust_remote_code,
    )
    check_max_length(train_dataset, processing_class, training, "train")
    for name, dataset in eval_sets.items():
        check_max_length(dataset, processing_class, training, names[name])
