"""The logged chosen / rejected metrics (`nca_trl.metrics`): what they mean with K > 2, ties and ragged K."""

import pytest
import torch

from nca_trl.metrics import prompt_metrics, sequence_metrics


def _metrics(g, rewards, slots=None):
    g, rewards = torch.tensor(g), torch.tensor(rewards)
    slots = torch.ones_like(g, dtype=torch.bool) if slots is None else torch.tensor(slots)
    return sequence_metrics(g, 10 * g, rewards, slots)


def test_chosen_and_rejected_do_not_depend_on_the_order_of_tied_completions():
    """Chosen was the first of the completions tied for the best reward, the others averaged into rejected: swapping
    two tied completions flipped `rewards/margins` (-0.3 / +0.3) and `rewards/accuracies`, on the same data."""
    listed = _metrics([[0.1, 0.5, 0.3]], [[0.0, 0.0, -1.0]])
    swapped = _metrics([[0.5, 0.1, 0.3]], [[0.0, 0.0, -1.0]])
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "best_first"):
        assert torch.equal(listed[key], swapped[key]), key
    assert listed["rewards/chosen"].item() == pytest.approx(0.3)  # the mean of the tied best, 0.1 and 0.5
    assert listed["rewards/rejected"].item() == pytest.approx(0.3) and listed["logps/chosen"].item() == pytest.approx(3)
    assert not listed["best_first"].item()  # every chosen must beat every rejected: 0.1 < 0.3
    assert _metrics([[0.4, 0.5, 0.3]], [[0.0, 0.0, -1.0]])["best_first"].item()


def test_a_pair_and_an_untied_row_mean_what_dpo_logs():
    m = _metrics([[0.7, 0.2, 0.0], [0.2, -0.4, 0.0]], [[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]],
                 [[True, True, True], [True, True, False]])
    assert m["rewards/chosen"].tolist() == pytest.approx([0.0, 0.2])  # the best; a pair's chosen
    assert m["rewards/rejected"].tolist() == pytest.approx([0.45, -0.4])  # the mean of the others; a pair's rejected
    assert m["best_first"].tolist() == [False, True]


def test_a_row_whose_rewards_all_tie_is_left_out_of_the_chosen_and_rejected_metrics():
    """It counted in `rewards/chosen`, `rewards/margins` and `logps/chosen` (margin 0.45 for g = 0.4, 0.1, -0.2), with
    its first completion as "chosen"; it has no rejected."""
    g = torch.tensor([[0.4, 0.1, -0.2], [0.3, 0.1, 0.0]])
    rewards, slots = torch.tensor([[1.0, 1.0, 1.0], [2.0, 1.0, 0.0]]), torch.ones(2, 3, dtype=torch.bool)
    tokens = torch.tensor([0, 1, 2, 3, 4, 5])  # one scored token per completion, slot-major: rows 0, 1, 0, 1, 0, 1
    logits = torch.tensor([10.0, 1.0, 20.0, 2.0, 30.0, 3.0])
    names, num, den = prompt_metrics(g, g, rewards, slots, tokens, torch.ones(6), logits, torch.ones(6, dtype=bool))
    value = {n: (num[:, i].sum() / den[:, i].sum()).item() for i, n in enumerate(names)}
    assert value["rewards/chosen"] == pytest.approx(0.3) and value["rewards/margins"] == pytest.approx(0.25)
    assert value["rewards/rejected"] == pytest.approx(0.05) and value["rewards/accuracies"] == 1.0
    assert value["logits/chosen"] == pytest.approx(1.0) and value["logits/rejected"] == pytest.approx(2.5)
    assert value["entropy"] == 1.0 and den[0, names.index("rewards/chosen")] == 0  # entropy: every token
