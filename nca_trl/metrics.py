"""The metrics of a rated batch, on tensors: what the trainers log (`rewards/*`, `logps/*`, the token metrics).

*Chosen* are each prompt's highest-reward completions (several where they tie), *rejected* those with a lower
reward, each side's mean logged as in `trl.DPOTrainer`'s logs (a pair: its chosen and its rejected): the values do not
depend on the order the completions are listed in. A prompt whose rewards all tie has no rejected, and is left out
of the chosen / rejected metrics (`rewards/*`, `logps/*`, `logits/*`, `mean_token_accuracy`), as of the accuracies.
The implicit reward of completion i is `g_i = beta * (log pi(y_i|x) - log pi_ref(y_i|x))`. A logged value is a
ratio of sums over the logged step's prompts (`prompt_metrics`): a mean over prompts, an accuracy
over the prompts or pairs where it is defined, a token mean over the scored tokens; never a mean of batch means,
which would weigh prompts by how the step was split into micro-batches and processes.

Shapes: `B` prompts, `Kmax` completion slots, `slots[b, i]` True where prompt b has completion i, `N = slots.sum()`.
"""

from __future__ import annotations

import torch

__all__ = ["PooledMetrics", "to_slots", "from_slots", "reward_tiers", "prompt_metrics", "sequence_metrics"]


def to_slots(values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Scatter per-sequence values `[N]`, in the collator's slot-major order, into `[B, Kmax]`, 0 in empty slots."""
    out = torch.zeros(slots.T.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(slots.T, values).T


def from_slots(values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_slots`: the `[N]` values of the valid slots, in slot-major order."""
    return values.T[slots.T]


def reward_tiers(rewards: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, Kmax]` masks of each prompt's chosen (every completion with its highest reward) and rejected (every one
    with a lower reward; none where the rewards all tie) completions."""
    top = rewards.masked_fill(~slots, float("-inf")).amax(dim=1, keepdim=True)
    chosen = slots & (rewards == top)
    return chosen, slots & ~chosen


def sequence_metrics(g: torch.Tensor, logps: torch.Tensor, rewards: torch.Tensor, slots: torch.Tensor) -> dict:
    """Per-prompt metrics and the counts behind the two accuracies.

    Args:
        g: `[B, Kmax]` implicit rewards; logps: `[B, Kmax]` policy sequence log-probs; rewards: `[B, Kmax]`; slots:
            `[B, Kmax]` bool.

    Returns:
        `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `logps/chosen`, `logps/rejected`: `[B]` each, the
        means over the chosen and the rejected completions (`reward_tiers`); `best_first` `[B]` bool (every chosen
        completion's g beats every rejected one's) and `ranked_rows` `[B]` bool (rows where these are defined: not
        all rewards equal); `chosen` `[B, Kmax]` (the chosen completions of the ranked rows) and `rejected`
        `[B, Kmax]`; `pairs` and `ranked` (`[B]`): each prompt's completion pairs with `r_i > r_j`, and how many of
        them have `g_i > g_j` (the pairwise ranking accuracy is their ratio).
    """
    chosen, rejected = reward_tiers(rewards, slots)
    ranked_rows = rejected.any(dim=1)
    chosen = chosen & ranked_rows.unsqueeze(1)

    def mean(values, mask):
        return values.masked_fill(~mask, 0).sum(dim=1) / mask.sum(dim=1).clamp(min=1)

    chosen_g, rejected_g = mean(g, chosen), mean(g, rejected)
    pairs = (rewards.unsqueeze(2) > rewards.unsqueeze(1)) & slots.unsqueeze(2) & slots.unsqueeze(1)
    return {
        "rewards/chosen": chosen_g,
        "rewards/rejected": rejected_g,
        "rewards/margins": chosen_g - rejected_g,
        "logps/chosen": mean(logps, chosen),
        "logps/rejected": mean(logps, rejected),
        "best_first": g.masked_fill(~chosen, float("inf")).amin(dim=1)
        > g.masked_fill(~rejected, float("-inf")).amax(dim=1),
        "ranked_rows": ranked_rows,
        "chosen": chosen,
        "rejected": rejected,
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
    best = from_slots(m["chosen"], slots)[token_sequence]  # [T]: the token is in a chosen completion
    worse = from_slots(m["rejected"], slots)[token_sequence]  # [T]: in a rejected one

    def per_prompt(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(slots.shape[0], device=slots.device).index_add_(0, prompt, values.float())

    one, ranked = torch.ones(slots.shape[0], device=slots.device), m["ranked_rows"].float()
    parts = {key: (m[key].float() * ranked, ranked) for key in
             ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")}
    parts["rewards/accuracies"] = ((m["best_first"] & m["ranked_rows"]).float(), ranked)
    parts["rewards/ranking_accuracy"] = (m["ranked"].float(), m["pairs"].float())
    parts["entropy"] = (per_prompt(entropy), per_prompt(torch.ones_like(entropy)))
    parts["logits/chosen"] = (per_prompt(mean_logits * best), per_prompt(best))
    parts["logits/rejected"] = (per_prompt(mean_logits * worse), per_prompt(worse))
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
