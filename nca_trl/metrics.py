"""The metrics of a rated batch, on tensors: what the trainers log (`rewards/*`, `logps/*`, the token metrics).

*Chosen* is each prompt's highest-reward completion (the first on ties), *rejected* the mean of its others, as in
`trl.DPOTrainer`'s logs. The implicit reward of completion i is `g_i = beta * (log pi(y_i|x) - log pi_ref(y_i|x))`.
A logged value is a ratio of sums over the logged step's prompts (`prompt_metrics`): a mean over prompts, an accuracy
over the prompts or pairs where it is defined, a token mean over the scored tokens; never a mean of batch means,
which would weigh prompts by how the step was split into micro-batches and processes.

Shapes: `B` prompts, `Kmax` completion slots, `slots[b, i]` True where prompt b has completion i, `N = slots.sum()`.
"""

from __future__ import annotations

import torch

__all__ = ["PooledMetrics", "to_slots", "from_slots", "best_slots", "prompt_metrics", "sequence_metrics"]


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
        defined: not all rewards equal); `pairs` and `ranked` (`[B]`): each prompt's completion pairs with
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
        "pairs": pairs.sum(dim=(1, 2)),
        "ranked": ((g.unsqueeze(2) > g.unsqueeze(1)) & pairs).sum(dim=(1, 2)),
    }


def prompt_metrics(g: torch.Tensor, logps: torch.Tensor, rewards: torch.Tensor, slots: torch.Tensor,
                   token_sequence: torch.Tensor, entropy: torch.Tensor, mean_logits: torch.Tensor,
                   is_top1: torch.Tensor, losses: torch.Tensor | None = None) -> tuple[list[str], torch.Tensor,
                                                                                     torch.Tensor]:
    """Every logged metric as a numerator and a denominator per prompt: the step's value is the sum of the
    numerators over its prompts (of every micro-batch and process) divided by the sum of the denominators.

    Args:
        g, logps, rewards, slots: as in `sequence_metrics`.
        token_sequence: `[T]` the sequence (slot-major index, `[0, N)`) of each scored completion token.
        entropy, mean_logits: `[T]` per scored token; is_top1: `[T]` bool, the token is the model's argmax.
        losses: `[B]` each prompt's loss (an evaluation's `loss`: a mean over prompts), or None.

    Returns:
        (names, numerators `[B, M]`, denominators `[B, M]`), float32.
    """
    m = sequence_metrics(g, logps, rewards, slots)
    rows = torch.arange(slots.shape[0], device=slots.device).unsqueeze(1).expand_as(slots)
    prompt = from_slots(rows, slots)[token_sequence]  # [T]: the prompt of each scored token
    best = from_slots(best_slots(rewards, slots)[1], slots)[token_sequence]  # [T]: in its prompt's best completion

    def per_prompt(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(slots.shape[0], device=slots.device).index_add_(0, prompt, values.float())

    one = torch.ones(slots.shape[0], device=slots.device)
    parts = {key: (m[key].float(), one) for key in
             ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")}
    parts["rewards/accuracies"] = ((m["best_first"] & m["ranked_rows"]).float(), m["ranked_rows"].float())
    parts["rewards/ranking_accuracy"] = (m["ranked"].float(), m["pairs"].float())
    parts["entropy"] = (per_prompt(entropy), per_prompt(torch.ones_like(entropy)))
    parts["logits/chosen"] = (per_prompt(mean_logits * best), per_prompt(best))
    parts["logits/rejected"] = (per_prompt(mean_logits * ~best), per_prompt(~best))
    parts["mean_token_accuracy"] = (per_prompt(is_top1 & best), per_prompt(best))
    if losses is not None:
        parts["loss"] = (losses.float(), one)
    names = list(parts)
    return names, torch.stack([parts[k][0] for k in names], 1), torch.stack([parts[k][1] for k in names], 1)


class PooledMetrics:
    """One mode's metrics until they are logged: per metric, the sums of the numerators and the denominators of
    every prompt (`prompt_metrics`) of every micro-batch and process.

    With `once_per_row` (an evaluation) a prompt counts once: one seen again by its row (`rows`, the trainers' row
    index) is the padding of a last batch, which `gather_for_metrics` drops from a map-style dataset's batches but
    cannot from a stream's (accelerate pads a stream's last batches with its first rows).
    """

    def __init__(self, once_per_row: bool = False):
        self.once_per_row, self.sums, self.seen = once_per_row, {}, set()

    def add(self, names: list[str], numerators: torch.Tensor, denominators: torch.Tensor,
            rows: torch.Tensor | None = None) -> None:
        """Add a gathered batch: `numerators`, `denominators` `[B, M]` for `names`; `rows` `[B]` or None."""
        if self.once_per_row and rows is not None:
            keep = []
            for i, row in enumerate(rows.tolist()):
                if row not in self.seen:
                    self.seen.add(row)
                    keep.append(i)
            numerators, denominators = numerators[keep], denominators[keep]
        for name, n, d in zip(names, numerators.sum(0).tolist(), denominators.sum(0).tolist()):
            total = self.sums.setdefault(name, [0.0, 0.0])
            total[0], total[1] = total[0] + n, total[1] + d

    def values(self) -> dict[str, float]:
        """Each metric's value: its numerators' sum over its denominators' (undefined where that is 0: left out)."""
        return {name: n / d for name, (n, d) in self.sums.items() if d > 0}

    def clear(self) -> None:
        self.sums.clear()
        self.seen.clear()
