"""Precomputed reference log-probs (`precompute_ref_log_probs=True`): K values per prompt, cached on disk.

The cache is a column `ref_logps` written next to the prepared dataset's own cache files. It is reused only when
*everything* that changes its values is the same: its key hashes

- the prepared dataset's fingerprint (the raw rows, the tokenization and `max_completions`),
- the tokenizer's chat template, special tokens and vocabulary size (explicitly, not only through the fingerprint),
- the reference model's weights and dtype (`trl.trainer.utils.hash_module`), its config and attention implementation,
  and the weight files of the folder it was loaded from (names, sizes, modification times) and its Hub commit: under
  ZeRO-3 every process holds its parameters partitioned into empty tensors, so TRL's hash covers names and dtypes
  only, and weights rewritten in place into the same folder reused the old values,
- `max_length`, `truncation_mode` and the batch layout (the collator truncates, after tokenization),
- the precision the forward runs in (`bf16` / `fp16` autocast),
- `CACHE_VERSION`, the format of this cache.

TRL's `DPOTrainer` keys its cache on the dataset and the model only, so a changed `max_length` reuses stale values.
The cache file is written by `datasets` through a temporary file renamed at the end: a run killed during the precompute
leaves no cache file that a later run could reuse. A dataset held in memory (`Dataset.from_list`, no cache files) on
several processes keeps the column in memory on each process instead (each would name a temporary file of its own).
"""

from __future__ import annotations

import logging
import os

from accelerate.utils import broadcast_object_list, is_peft_model, tqdm
from datasets import Dataset, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from trl.models import prepare_deepspeed

from .runtime.backbone import use_language_backbones
from .runtime.files import WEIGHT_SUFFIXES
from .runtime.router_aux import check_router_aux
from .shared_prompt.families import original_attention_implementation

logger = logging.getLogger("nca_trl")

__all__ = ["BASE_REFERENCE", "CACHE_VERSION", "ref_cache_key", "precompute_ref_logps", "reference_adapter"]

CACHE_VERSION = "nca-trl/ref_logps/v2"
#: An attribute set (True) on a PEFT model with a pretrained adapter before the trainer is built, when its reference
#: is its base model with the adapter disabled (`nca-trl train` with `ref_model_name_or_path` naming the adapter's
#: base): TRL's frozen copy of the adapter ("ref") is then not the reference, in the precompute either.
BASE_REFERENCE = "nca_trl_reference_is_base"


def reference_adapter(model) -> str | None:
    """The adapter that gives a PEFT policy's reference log-probs when there is no reference model: TRL's frozen copy
    "ref" of a pretrained adapter, or None (every adapter disabled: the base model) where there is none or the model
    is marked `BASE_REFERENCE`."""
    if getattr(model, BASE_REFERENCE, False) or "ref" not in model.peft_config:
        return None
    return "ref"


def ref_cache_key(trainer, dataset: Dataset) -> str:
    """The cache key of `dataset`'s reference log-probs under `trainer` (see the module docstring for what it covers)."""
    args, collator = trainer.args, trainer.data_collator
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    reference = trainer.model if trainer.ref_model is None else trainer.ref_model
    unwrapped = trainer.accelerator.unwrap_model(reference)
    config = getattr(unwrapped, "config", None)
    parts = {
        "dataset": dataset._fingerprint,
        "tokenizer": (getattr(tokenizer, "chat_template", None), str(getattr(tokenizer, "special_tokens_map", "")),
                      len(tokenizer) if tokenizer is not None else None),
        "model": trainer._precompute_model_hash,
        # The hash covers every adapter of a PEFT policy; which one is the reference is the choice here
        "peft_reference": (reference_adapter(trainer.accelerator.unwrap_model(trainer.model))
                           if trainer.ref_model is None and is_peft_model(trainer.model) else None),
        "model_config": config.to_json_string(use_diff=False) if config is not None else None,
        "attention": original_attention_implementation(unwrapped) if config is not None else None,  # not in its JSON
        "weights": (_weight_files(getattr(config, "_name_or_path", None)), getattr(config, "_commit_hash", None)),
        "max_length": args.max_length,
        "truncation_mode": args.truncation_mode,
        "layout": getattr(collator, "shared_prompt", None),
        "precision": {"bf16": bool(args.bf16), "fp16": bool(args.fp16)},
        "version": CACHE_VERSION,
    }
    return Hasher.hash(parts)


def _weight_files(path) -> list | None:
    """(name, size, modification time) of the weight files in the local folder `path` (None if it is not one)."""
    if not path or not os.path.isdir(path):
        return None
    return sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path)
                  if e.name.endswith(WEIGHT_SUFFIXES))


def _check_finite(trainer, dataset: Dataset, name: str, rows: list[list[float]]) -> None:
    """`NonFiniteError` (nothing cached) if the reference gave a NaN or infinite log-prob: training on it stopped at
    the first step, blaming the rows and the learning rate."""
    import math

    from .runtime.errors import ROW_INDEX
    from .runtime.safety import NonFiniteError

    bad = [i for i, values in enumerate(rows) if not all(math.isfinite(v) for v in values)]
    if not bad:
        return
    given = dataset[ROW_INDEX] if ROW_INDEX in dataset.column_names else list(range(len(rows)))
    shown = [given[i] for i in bad[:10]]
    raise NonFiniteError(
        f"The reference model's log-probs are not finite (NaN or infinite) for {len(bad)} of {len(rows)} rows of the "
        f"{name} dataset (rows {shown}{', ...' if len(bad) > 10 else ''}, 0-based as given to the trainer; row "
        f"{given[bad[0]]}: {rows[bad[0]]}), computed by `precompute_ref_log_probs`; nothing was cached or trained. "
        f"The reference ({_reference_name(trainer)}) gives them, not the data: check its weights for NaN / inf, and "
        "its dtype (float16 overflows: load it in bfloat16 or float32).")


def _reference_name(trainer) -> str:
    model = trainer.ref_model if trainer.ref_model is not None else trainer.model
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    what = "the `ref_model`" if trainer.ref_model is not None else "the policy's initial weights"
    return f"{what}, {path}" if path else what


def precompute_ref_logps(trainer, dataset: Dataset, name: str, batch_size: int) -> Dataset:
    """`dataset` with a `ref_logps` column (K floats per row), from the cache or computed now (all processes)."""
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "`precompute_ref_log_probs=True` is not supported with IterableDataset. Please use a map-style Dataset or "
            "set `precompute_ref_log_probs=False`. (nca-trl: the reference log-probs are cached per dataset, which a "
            "stream does not have; without precomputing, the reference model runs beside the policy at each step.)"
        )
    if "ref_logps" in dataset.column_names:  # prepared before (by another trainer): its values are not this one's
        logger.info("The %s dataset has a 'ref_logps' column already: replaced by this trainer's reference log-probs.",
                    name)
        dataset = dataset.remove_columns("ref_logps")
    trainer._setup_layout()  # called from the parent's __init__: the key and the precompute need the training layout
    check_router_aux(trainer)  # before the reference pass, not after it
    use_language_backbones(trainer)  # likewise: TRL's fused LM head runs the reference pass
    # Rank 0's key for all ranks (ZeRO-3 shards make the model hash rank-dependent): one shared cache file
    key = [ref_cache_key(trainer, dataset)]
    broadcast_object_list(key, from_process=0)
    # A dataset in memory (no cache files) names a temporary file of each process's own: on several processes the
    # column is kept in memory on each (every process gathers all the rows), computed anew
    in_memory = not dataset.cache_files and trainer.accelerator.num_processes > 1
    cache_file = None if in_memory else dataset._get_cache_file_path(key[0])
    if cache_file is not None and os.path.exists(cache_file):
        logger.info("Reference log-probs of the %s dataset: reusing %s", name, cache_file)
        return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)

    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=trainer.data_collator,
        num_workers=trainer.args.dataloader_num_workers,
        pin_memory=trainer.args.dataloader_pin_memory,
        shuffle=False,
    )
    loader = trainer.accelerator.prepare(loader)
    # Before `train` the DeepSpeed parameters are on CPU (ZeRO-1/2) or sharded (ZeRO-3): as in the parent, an
    # inference engine places and gathers them, built once and reused.
    if trainer.ref_model is None and trainer.is_deepspeed_enabled:
        if trainer._precompute_engine is None:
            trainer._precompute_engine = prepare_deepspeed(trainer.model, trainer.accelerator)
        model = trainer._precompute_engine
    else:
        model = trainer.model if trainer.ref_model is None else trainer.ref_model

    rows = []
    accelerator = trainer.accelerator
    for batch in tqdm(loader, desc=f"Computing reference log probs for {name} dataset"):
        slots = batch["completion_slots"]
        ref = trainer.compute_ref_log_probs(model, batch)
        # Kmax differs between ranks: pad to a common width before gathering, then keep each row's valid slots
        ref = accelerator.pad_across_processes(ref, dim=1, pad_index=0.0)
        slots = accelerator.pad_across_processes(slots, dim=1, pad_index=False)
        ref, slots = accelerator.gather_for_metrics((ref, slots))
        rows.extend(r[s].tolist() for r, s in zip(ref.float().cpu(), slots.bool().cpu()))
    _check_finite(trainer, dataset, name, rows)

    if in_memory:
        return dataset.add_column("ref_logps", rows, new_fingerprint=key[0])
    if accelerator.is_main_process:
        dataset.map(
            lambda _, indices: {"ref_logps": [rows[i] for i in indices]},
            with_indices=True,
            batched=True,
            remove_columns=dataset.column_names,
            new_fingerprint=key[0],
            cache_file_name=cache_file,
            desc=f"Caching reference log probs for {name} dataset",
        )
    accelerator.wait_for_everyone()
    return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)
