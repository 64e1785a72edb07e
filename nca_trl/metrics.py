"""Sequence-level metrics of a rated batch, on tensors: what the trainers log (`rewards/*`, `logps/*`).

*Chosen* is each prompt's highest-reward completion (the first on ties), *rejected* the mean of its others, as in
`trl.DPOTrainer`'s logs. The implicit reward of completion i is `g_i = beta * (log pi(y_i|x) - log pi_ref(y_i|x))`.

Shapes: `B` prompts, `Kmax` completion slots, `slots[b, i]` True where prompt b has completion i, `N = slots.sum()`.
"""

from __future__ import annotations

import torch

__all__ = ["to_slots", "from_slots", "best_slots", "sequence_metrics"]


def to_slots(values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Scatter per-sequence values `[N]`, in the collator's slot-major order, into `[B, Kmax]`, 0 in empty slots."""
    out = torch.zeros(slots.T.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(slots.T, values).T


def from_slots(values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_slots`: the `[N]` values of the valid slots, in slot-major order."""
    return values.T[slots.T]


def best_slots(rewards: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's highest-reward completion (the first on ties): its slot index `[B, 1]` and a `[B, Kmax]` mask."""
    best = rewards.masked_fill(~slots, float("-inf")).argmax(dim=1, keepdim=True)
    return best, torch.zeros_like(slots).scatter_(1, best, True)


def sequence_metrics(g: torch.Tensor, logps: torch.Tensor, rewards: torch.Tensor, slots: torch.Tensor) -> dict:
    """Per-prompt metrics and the counts behind the two accuracies.

    Args:
        g: `[B, Kmax]` implicit rewards; logps: `[B, Kmax]` policy sequence log-probs; rewards: `[B, Kmax]`; slots:
            `[B, Kmax]` bool.

    Returns:
        `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `logps/chosen`, `logps/rejected`: `[B]` each;
        `best_first` `[B]` bool (the best completion's g beats every completion with a strictly lower reward;
        completions tied with the best are not its competitors) and `ranked_rows` `[B]` bool (rows where that is
        defined: not all rewards equal); `pairs` and `ranked` (scalars): completion pairs of a prompt with
        `r_i > r_j`, and how many of them have `g_i > g_j` (the pairwise ranking accuracy is their ratio).
    """
    best, is_best = best_slots(rewards, slots)
    others = slots & ~is_best
    n_others = others.sum(dim=1).clamp(min=1)
    chosen_g = g.gather(1, best).squeeze(1)
    lower = slots & (rewards < rewards.gather(1, best))
    pairs = (rewards.unsqueeze(2) > rewards.unsqueeze(1)) & slots.unsqueeze(2) & slots.unsqueeze(1)
    return {
        "rewards/chosen": chosen_g,
        "rewards/rejected": (g * others).sum(dim=1) / n_others,
        "rewards/margins": chosen_g - (g * others).sum(dim=1) / n_others,
        "logps/chosen": logps.gather(1, best).squeeze(1),
        "logps/rejected": (logps * others).sum(dim=1) / n_others,
        "best_first": (chosen_g.unsqueeze(1) > g).masked_fill(~lower, True).all(dim=1),
        "ranked_rows": lower.any(dim=1),
        "pairs": pairs.sum(),
        "ranked": ((g.unsqueeze(2) > g.unsqueeze(1)) & pairs).sum(),
    }
