"""Checks that `nca-trl train` runs after loading the data and before loading any model: what would otherwise fail
only once the model is loaded.

- `check_not_empty`: a dataset left with no row after conversion (e.g. UltraFeedback rows whose ratings are all
  unusable are dropped) would fail in the trainer with a bare `StopIteration`, after the model is loaded.
- `check_before_training`: refuses a checkpoint TRL's fused LM head cannot run, from its config
  (`nca_trl.runtime.backbone.check_checkpoint`: the multimodal Llama 4), loads the tokenizer only (`AutoProcessor`,
  as the trainer does) and prepares every dataset exactly as the trainer would
  (`nca_trl.data.tokenize.prepare_rated_dataset`), so a bad row is named, and a dataset whose every prompt fills
  `max_length` is refused, before any model is loaded. The trainer checks the prepared rows again as token ids
  (a pass over their ids and rewards: nothing left to drop, nothing logged twice).

The config checks (batch sizes, fp16 / bf16 on this device) run when the config is built, in
`nca_trl.config`.
"""

from __future__ import annotations

__all__ = ["check_before_training", "check_not_empty"]


def check_not_empty(dataset, dataset_name: str = "train") -> None:
    """Raise a `ValueError` if `dataset` (a `datasets.Dataset`, or None) has no row."""
    if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(
            f"The {dataset_name} dataset has no row left after loading and conversion (a converter drops rows it "
            "cannot use, e.g. UltraFeedback rows with fewer than 2 usable ratings: see the warning above). Fix: check "
            "`dataset_name`, `dataset_format`, `dataset_format_kwargs` and the split."
        )


def check_before_training(args, train_dataset, eval_dataset, stats: dict | None = None):
    """`nca-trl train`'s data work between loading the data and building the trainer (`args`: the parsed `TrainArgs`;
    `eval_dataset`: None, a dataset or a dict of them). Loads the tokenizer only, then prepares every dataset exactly as
    the trainer would (`nca_trl.data.tokenize.prepare_rated_dataset`: every row validated once, converted, tokenized,
    rows without room for a completion dropped with a count, an error if that is every row). Returns
    `(train, eval)` prepared, which the trainer checks as token ids; what was dropped from each, and how many of its
    completions `max_length` cuts, go into `stats` (`{dataset name: {"ties_dropped": ..., "too_long_dropped": ...,
    "cut_completions": ...}}`) when given."""
    from transformers import AutoProcessor

    from ..data.tokenize import prepare_rated_dataset, with_row_index
    from ..runtime.backbone import check_checkpoint

    training = args.training
    eval_sets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
    names = {name: name if name == "eval" else f"eval ({name!r})" for name in eval_sets}
    check_not_empty(train_dataset, "train")
    for name, dataset in eval_sets.items():
        check_not_empty(dataset, names[name])
    revision = (training.model_init_kwargs or {}).get("revision")
    # A model TRL's fused LM head cannot run, from its config
    check_checkpoint(args.model.model_name_or_path, "model_name_or_path", revision)
    if args.script.ref_model_name_or_path:
        check_checkpoint(args.script.ref_model_name_or_path, "ref_model_name_or_path", revision)
    processing_class = AutoProcessor.from_pretrained(
        args.model.model_name_or_path, revision=revision, trust_remote_code=training.trust_remote_code
    )
    max_completions = getattr(training, "max_completions", None)

    def prepare(dataset, name):
        if dataset is None:
            return None
        dropped = {} if stats is None else stats.setdefault(name, {})
        return prepare_rated_dataset(with_row_index(dataset), processing_class, training, name, max_completions,
                                     dropped)

    train = prepare(train_dataset, "train")
    prepared = {name: prepare(dataset, names[name]) for name, dataset in eval_sets.items()}
    if not isinstance(eval_dataset, dict):
        return train, prepared["eval"]
    return train, prepared
