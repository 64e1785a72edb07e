"""Collator stacking every completion of a batch of prompts into one padded `[sum K_b, L]` batch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.utils import pad

from ..shared_prompt.packing import build_shared_prompt_batch
from ..runtime.errors import ROW_INDEX
from .formats import PAIR_COLUMN
from .rewards import TIE_SPREAD

__all__ = ["ROW_COLUMNS", "DataCollatorForRatedCompletions", "check_collator"]

logger = logging.getLogger("nca_trl")
_warned = {"empty_prompt": False}  # warnings shown once per process, as in `data.tokenize`

#: The prepared row's columns that batches are built from (the trainers' signature columns: with
#: `remove_unused_columns`, the only ones the collator gets)
ROW_COLUMNS = ("prompt_ids", "completion_ids", "rewards", PAIR_COLUMN, "ref_logps", ROW_INDEX)


@dataclass
class DataCollatorForRatedCompletions(DataCollatorMixin):
    """
    Data collator for rated completions: each example brings one prompt and its K_b completions.

    Each example holds `"prompt_ids"` (list of ints), `"completion_ids"` (K_b lists of ints), `"rewards"` (K_b
    numbers, validated before: see `nca_trl.data.rewards.check_rewards`) and optionally `"ref_logps"` (K_b floats,
    precomputed reference log-probs). Sequences are
    `prompt + completion`, truncated per sequence like `trl.DPOTrainer`'s collator, in slot-major order (completion 0 of
    every prompt, then completion 1 of every prompt that has one, ...; for K = 2 this is `DPOTrainer`'s
    `[chosen..., rejected...]`), and right-padded.

    Returns:
        - `input_ids`, `attention_mask`, `completion_mask`: `[N, L]` with `N = sum_b K_b`;
        - `rewards`: `[B, Kmax]` float32, each prompt's rewards minus its best reward (subtracted in float64, so that
          adding a constant to a prompt's rewards changes nothing however large it is; within `TIE_SPREAD` of the
          best is 0, tied with it), 0 in empty slots;
        - `completion_slots`: `[B, Kmax]` bool, True where prompt b has completion i; `completion_slots.T` flattened
          (slot-major) lists the N sequences in order;
        - `preference_pair`: `[B]` bool, True for a prompt that came as a chosen/rejected pair (its targets are
          one-hot on the chosen whatever `alpha` is); False where an example has no `"preference_pair"`;
        - `ref_logps`: `[B, Kmax]` float32, when the examples carry them;
        - `_nca_row_index` (`ROW_INDEX`): `[B]`, each prompt's row in the dataset given to the trainer, when the
          examples carry it (the trainers' errors name these rows);
        - `sequence_tokens`: `[B]`, each prompt's tokens in the plain layout (prompt repeated per completion, no
          padding), which the `num_tokens` metric counts.

    `completion_slots` comes first, so that the batch size read from a batch's first tensor (`Trainer`'s evaluation
    loop, on a dataset without a length) is the number of prompts. No tensor is 0-dimensional.

    With `shared_prompt=True` the sequences are laid out in one padding-free row instead
    (`nca_trl.shared_prompt.packing`: `input_ids` `[1, T]`, `position_ids`, `shift_labels`, `token_sequence`,
    `token_column`, `plain_width` and the varlen attention layout `cu_seqlens_q`, `cu_seqlens_k`, `kv_index`,
    `max_seqlen_q`, `max_seqlen_k`).

    Example:
    ```python
    >>> collator = DataCollatorForRatedCompletions(pad_token_id=0)
    >>> batch = collator([
    ...     {"prompt_ids": [1, 2], "completion_ids": [[3], [4, 5], [6]], "rewards": [1.0, 0.5, 0.0]},
    ...     {"prompt_ids": [7], "completion_ids": [[8, 9], [10]], "rewards": [2.0, 3.0]},
    ... ])
    >>> batch["input_ids"]
    tensor([[ 1,  2,  3,  0],
            [ 7,  8,  9,  0],
            [ 1,  2,  4,  5],
            [ 7, 10,  0,  0],
            [ 1,  2,  6,  0]])
    >>> batch["completion_slots"]
    tensor([[ True,  True,  True],
            [ True,  True, False]])
    ```
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    shared_prompt: bool = False

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.truncation_mode == "keep_start":
            window = slice(None, self.max_length)
        elif self.truncation_mode == "keep_end":
            window = slice(-self.max_length, None) if self.max_length is not None else slice(None)
        else:
            raise ValueError(f"Unsupported truncation mode: {self.truncation_mode}, expected 'keep_start' or 'keep_end'")

        k_max = max(len(example["completion_ids"]) for example in examples)
        # A prompt with no token (a tokenizer without BOS, a prompt merged whole into its completions' first tokens)
        # has no last token for its completions to share: its batch takes the plain layout, the same log-probs
        if self.shared_prompt and all(example["prompt_ids"] for example in examples):
            output = build_shared_prompt_batch(examples, self.max_length)
        else:
            if self.shared_prompt and not _warned["empty_prompt"]:
                _warned["empty_prompt"] = True
                logger.warning("A batch holds a prompt with no token left before its completions (no BOS, and its "
                               "text merged into the completions' first tokens): such batches take the plain padded "
                               "layout, with the same log-probs. Shown once.")
            output = self._padded(examples, k_max, window)
        slots = torch.zeros(len(examples), k_max, dtype=torch.bool)
        rewards = torch.zeros(len(examples), k_max, dtype=torch.float32)
        for b, example in enumerate(examples):
            k = len(example["completion_ids"])
            slots[b, :k] = True
            # Targets depend on reward differences only: shift in float64 before the float32 cast (1e9 + r would lose
            # r in float32, and rewards past float32's max would become inf); validation keeps differences in range
            row = torch.tensor(example["rewards"], dtype=torch.float64)
            shifted = row - row.max()
            # Within `TIE_SPREAD` of the best is tied with it, as validation and `ties` count ties (0.1 + 0.2 vs 0.3:
            # alpha 0 put all the weight on the float-rounding winner of a prompt counted as all-tied)
            rewards[b, :k] = shifted.masked_fill(shifted >= -TIE_SPREAD, 0.0)
        output = {"completion_slots": slots, "rewards": rewards, **output}
        output[PAIR_COLUMN] = torch.tensor([example.get(PAIR_COLUMN) is True for example in examples])
        # Tokens of the plain layout (prompt repeated per completion, no padding): the `num_tokens` metric counts these
        output["sequence_tokens"] = torch.tensor(
            [sum(len((e["prompt_ids"] + c)[window]) for c in e["completion_ids"]) for e in examples]
        )
        if "ref_logps" in examples[0]:
            ref_logps = torch.zeros(len(examples), k_max, dtype=torch.float32)
            for b, example in enumerate(examples):
                ref_logps[b, : len(example["ref_logps"])] = torch.tensor(example["ref_logps"], dtype=torch.float32)
            output["ref_logps"] = ref_logps
        if all(ROW_INDEX in example for example in examples):
            output[ROW_INDEX] = torch.tensor([int(example[ROW_INDEX]) for example in examples])
        return output

    def _padded(self, examples, k_max, window):
        # Slot-major order: completion 0 of every prompt, then completion 1, ... (for K = 2, DPO's [chosen, rejected])
        input_ids, completion_mask = [], []
        for i in range(k_max):
            for example in examples:
                if i < len(example["completion_ids"]):
                    prompt, completion = example["prompt_ids"], example["completion_ids"][i]
                    input_ids.append(torch.tensor((prompt + completion)[window]))
                    completion_mask.append(torch.tensor(([0] * len(prompt) + [1] * len(completion))[window]))
        attention_mask = [torch.ones_like(ids) for ids in input_ids]
        pad_kwargs = {"padding_side": "right", "pad_to_multiple_of": self.pad_to_multiple_of}
        return {
            "input_ids": pad(input_ids, padding_value=self.pad_token_id, **pad_kwargs),
            "attention_mask": pad(attention_mask, padding_value=0, **pad_kwargs),
            "completion_mask": pad(completion_mask, padding_value=0, **pad_kwargs),
        }


def check_collator(collator, dataset, remove_unused_columns: bool = True) -> None:
    """A `data_collator` given to the trainer that does not build rated batches (e.g. TRL's pairwise
    `DataCollatorForPreference`, which raised `KeyError: 'chosen_ids'` at the first step) is refused at construction:
    one that is not a `DataCollatorForRatedCompletions` collates the first prepared row of a map-style `dataset` (its
    `ROW_COLUMNS` with `remove_unused_columns`, as the dataloader gives it), and must give the batch keys the loss
    reads."""
    if collator is None or isinstance(collator, DataCollatorForRatedCompletions) or not hasattr(dataset, "__len__") \
            or len(dataset) == 0:
        return
    name = getattr(collator, "__name__", type(collator).__name__)
    try:
        row = dataset[0]
        batch = collator([{k: v for k, v in row.items() if k in ROW_COLUMNS} if remove_unused_columns else row])
        problem = None if {"completion_slots", "rewards"} <= set(batch) else f"it gave the keys {sorted(batch)}"
    except Exception as e:  # whatever a foreign collator raises on a rated row: named below
        problem = f"collating the first training row raised {type(e).__name__}: {e}"
    if problem:
        raise ValueError(
            f"data_collator={name} does not build the batches of K rated completions per prompt that the trainer's "
            f"loss reads (`completion_slots`, `rewards`, ...): {problem}. Leave `data_collator` unset (the trainer "
            "builds a `nca_trl.data.collator.DataCollatorForRatedCompletions`), or pass one of those."
        )
