"""DataCollatorForRatedCompletions on hand-made token ids: layout, padding, masks, rewards, reference log-probs."""

import pytest
import torch

from nca_trl.data import DataCollatorForRatedCompletions
from nca_trl.shared_prompt.packing import LAYOUT_KEYS


def examples():
    """Prompt 0: 2 prompt tokens, K = 3; prompt 1: 1 prompt token, K = 2 (the docstring's example)."""
    return [
        {"prompt_ids": [1, 2], "completion_ids": [[3], [4, 5], [6]], "rewards": [1.0, 0.5, 0.0]},
        {"prompt_ids": [7], "completion_ids": [[8, 9], [10]], "rewards": [2.0, 3.0]},
    ]


def test_preference_pair_flag_per_prompt():
    rows = examples()
    rows[1]["preference_pair"] = True  # came as a chosen/rejected pair: one-hot targets in the loss
    for shared_prompt in (False, True):
        batch = DataCollatorForRatedCompletions(pad_token_id=0, shared_prompt=shared_prompt)(rows)
        assert batch["preference_pair"].tolist() == [False, True]


def test_slot_major_padded_layout():
    batch = DataCollatorForRatedCompletions(pad_token_id=0)(examples())
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "rewards", "completion_slots",
                          "sequence_tokens", "preference_pair"}
    assert batch["preference_pair"].tolist() == [False, False]  # no flag: rated rows
    # N = 3 + 2 = 5 sequences, slot-major: (p0, c0), (p1, c0), (p0, c1), (p1, c1), (p0, c2); L = 4 (longest)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 0],
        [7, 8, 9, 0],
        [1, 2, 4, 5],
        [7, 10, 0, 0],
        [1, 2, 6, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
    ]
    assert batch["completion_mask"].tolist() == [
        [0, 0, 1, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 1],
        [0, 1, 0, 0],
        [0, 0, 1, 0],
    ]
    assert batch["completion_slots"].tolist() == [[True, True, True], [True, True, False]]
    # completion_slots.T flattened lists the sequences in order: (0,0) (1,0) (0,1) (1,1) (0,2)
    assert batch["completion_slots"].T.flatten().tolist() == [True, True, True, True, True, False]
    assert batch["sequence_tokens"].sum().item() == 3 + 3 + 4 + 2 + 3
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].shape == batch["completion_mask"].shape == (5, 4)


def test_rewards_are_shifted_by_each_prompts_best_and_zero_in_empty_slots():
    batch = DataCollatorForRatedCompletions(pad_token_id=0)(examples())
    rewards = batch["rewards"]
    assert rewards.dtype == torch.float32 and rewards.shape == (2, 3)
    assert rewards.tolist() == [[0.0, -0.5, -1.0], [-1.0, 0.0, 0.0]]  # [2, 3] - 3; the empty slot stays 0
    ints = [{"prompt_ids": [1], "completion_ids": [[2], [3]], "rewards": [4, 9]}]
    assert DataCollatorForRatedCompletions(pad_token_id=0)(ints)["rewards"].tolist() == [[-5.0, 0.0]]


def test_rewards_within_the_tie_spread_of_the_best_tie_with_it():
    """0.3 and 0.1 + 0.2 tie (validation counts the prompt as all-tied, `ties: drop` drops it), but the collator kept
    their 5.6e-17 gap, so alpha 0 put all the weight on the float-rounding winner instead of splitting it."""
    from nca_trl.losses import reward_targets

    rows = [{"prompt_ids": [1], "completion_ids": [[2], [3], [4]], "rewards": [0.3, 0.1 + 0.2, 0.3 - 1e-6]}]
    rewards = DataCollatorForRatedCompletions(pad_token_id=0)(rows)["rewards"]
    assert rewards[0, :2].tolist() == [0.0, 0.0] and rewards[0, 2].item() == pytest.approx(-1e-6)
    assert reward_targets(rewards, 0.0).tolist() == [[0.5, 0.5, 0.0]]


def test_truncation_keep_start_and_keep_end():
    batch = DataCollatorForRatedCompletions(pad_token_id=0, max_length=3)(examples())
    assert batch["input_ids"].tolist() == [[1, 2, 3], [7, 8, 9], [1, 2, 4], [7, 10, 0], [1, 2, 6]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1], [0, 1, 1], [0, 0, 1], [0, 1, 0], [0, 0, 1]]
    assert batch["sequence_tokens"].sum().item() == 3 + 3 + 3 + 2 + 3

    batch = DataCollatorForRatedCompletions(pad_token_id=0, max_length=3, truncation_mode="keep_end")(examples())
    assert batch["input_ids"].tolist() == [[1, 2, 3], [7, 8, 9], [2, 4, 5], [7, 10, 0], [1, 2, 6]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1], [0, 1, 1], [0, 1, 1], [0, 1, 0], [0, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]]

    with pytest.raises(ValueError, match="keep_middle"):
        DataCollatorForRatedCompletions(pad_token_id=0, max_length=3, truncation_mode="keep_middle")(examples())


def test_pad_to_multiple_of_and_pad_token():
    batch = DataCollatorForRatedCompletions(pad_token_id=99, pad_to_multiple_of=8)(examples())
    assert batch["input_ids"].shape == (5, 8)
    assert batch["input_ids"][3].tolist() == [7, 10] + [99] * 6
    assert batch["attention_mask"][3].tolist() == [1, 1] + [0] * 6
    assert batch["completion_mask"][3].tolist() == [0, 1] + [0] * 6


def test_ref_logps_are_laid_out_like_the_rewards():
    rows = examples()
    rows[0]["ref_logps"], rows[1]["ref_logps"] = [-1.0, -2.0, -3.0], [-4.0, -5.0]
    batch = DataCollatorForRatedCompletions(pad_token_id=0)(rows)
    assert batch["ref_logps"].dtype == torch.float32
    assert batch["ref_logps"].tolist() == [[-1.0, -2.0, -3.0], [-4.0, -5.0, 0.0]]


def test_shared_prompt_output():
    rows = examples()
    rows[0]["ref_logps"], rows[1]["ref_logps"] = [-1.0, -2.0, -3.0], [-4.0, -5.0]
    batch = DataCollatorForRatedCompletions(pad_token_id=0, shared_prompt=True)(rows)
    assert set(batch) == {
        "input_ids", "position_ids", "shift_labels", "token_sequence", "token_column", "plain_width", *LAYOUT_KEYS,
        "rewards", "completion_slots", "sequence_tokens", "ref_logps", "preference_pair",
    }
    # One flat row: prompt 0's prefix [1], then its last prompt token 2 before each completion; prompt 1 likewise
    assert batch["input_ids"].tolist() == [[1, 2, 3, 2, 4, 5, 2, 6, 7, 8, 9, 7, 10]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 1, 2, 3, 1, 2, 0, 1, 2, 0, 1]]
    # Scored tokens carry their slot-major sequence number, as in the plain layout
    assert batch["token_sequence"].tolist() == [-1, 0, -1, 2, 2, -1, 4, -1, 1, 1, -1, 3, -1]
    # Rewards, slots, reference log-probs and the token count are those of the plain layout
    plain = DataCollatorForRatedCompletions(pad_token_id=0)(rows)
    for key in ("rewards", "completion_slots", "ref_logps", "sequence_tokens"):
        assert torch.equal(batch[key], plain[key]), key
