"""NCA and InfoNCA losses on tensors (Chen et al., "Noise Contrastive Alignment of Language Models with Explicit
Rewards", NeurIPS 2024, arXiv 2402.05369).

For a prompt with K completions, log-ratios `l_i = log pi_theta(y_i|x) - log pi_ref(y_i|x)` and raw rewards `r_i`:

    g_i = beta * l_i                                   implicit reward of the policy
    p_i = softmax(r / alpha)_i                         target weights (alpha = 0: one-hot on the best, ties split)
    InfoNCA = - sum_i p_i log softmax(g)_i
    NCA     = - sum_i p_i log sigmoid(g_i) - (1/K) sum_i log sigmoid(-g_i)

Batches are `[B, K]` tensors; `mask[b, i]` is True where prompt b has a completion i, so prompts with different K
share one batch. `alpha` is one float or one value per prompt (`[B]`): preference pairs have one-hot targets (the
paper's K = 2 case, alpha -> 0) while rated rows of the same batch keep the configured temperature. Everything is
computed in float32 whatever the input dtype; values in masked slots never matter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["reward_targets", "infonca_loss", "nca_loss"]


Alpha = float | torch.Tensor  # one reward temperature, or one per prompt `[B]`


def _check(
    rewards: torch.Tensor,
    mask: torch.Tensor | None,
    alpha: Alpha,
    logratios: torch.Tensor | None = None,
    beta: float | None = None,
) -> torch.Tensor:
    """Validate the arguments and return the boolean mask `[B, K]` (all True when `mask` is None)."""
    if isinstance(alpha, torch.Tensor):
        if alpha.shape not in ((), (rewards.shape[0],)):
            raise ValueError(f"alpha must be a float or have shape [B] = [{rewards.shape[0]}], got {tuple(alpha.shape)}.")
        if not (alpha >= 0).all():  # NaN too
            raise ValueError(f"alpha must be >= 0 (0 means one-hot targets on the best completion), got {alpha}.")
    elif not alpha >= 0:
        raise ValueError(f"alpha must be >= 0 (0 means one-hot targets on the best completion), got {alpha}.")
    if beta is not None and not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}.")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape [B, K], got shape {tuple(rewards.shape)}.")
    if logratios is not None and logratios.shape != rewards.shape:
        raise ValueError(
            f"logratios and rewards must have the same shape [B, K], got {tuple(logratios.shape)} and "
            f"{tuple(rewards.shape)}."
        )
    if mask is None:
        mask = torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    elif mask.shape != rewards.shape:
        raise ValueError(f"mask must have the shape of rewards {tuple(rewards.shape)}, got {tuple(mask.shape)}.")
    mask = mask.to(device=rewards.device, dtype=torch.bool)
    counts = mask.sum(dim=1)
    if (counts < 2).any():
        row = int(torch.nonzero(counts < 2)[0])
        raise ValueError(
            f"every row needs at least 2 valid completions; row {row} has {int(counts[row])} (check `mask`)."
        )
    finite = torch.isfinite(rewards.masked_fill(~mask, 0)).all(dim=1)
    if not finite.all():
        row = int(torch.nonzero(~finite)[0])
        raise ValueError(f"rewards must be finite where `mask` is True: row {row} has "
                         f"{rewards[row][mask[row]].tolist()}.")
    return mask


def reward_targets(rewards: torch.Tensor, alpha: Alpha, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Target weights `p = softmax(rewards / alpha)` over each row's valid completions.

    Args:
        rewards (`torch.Tensor` of shape `[B, K]`): raw scalar rewards, any scale and dtype.
        alpha (`float` or `torch.Tensor` of shape `[B]`): reward temperature, >= 0, for all rows or per row. `0` is the
            limit alpha -> 0: all mass on the highest reward, shared evenly between ties.
        mask (`torch.Tensor` of shape `[B, K]`, *optional*): True where the completion exists.

    Returns:
        `torch.Tensor` of shape `[B, K]`, float32, rows summing to 1, 0 in masked slots.

    Example:
    ```python
    >>> reward_targets(torch.tensor([[3.0, 3.0, 1.0]]), alpha=0.0)
    tensor([[0.5000, 0.5000, 0.0000]])
    >>> reward_targets(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), alpha=torch.tensor([0.0, 1.0]))  # a pair, a rated row
    tensor([[1.0000, 0.0000],
            [0.7311, 0.2689]])
    ```
    """
    return _targets(rewards, alpha, _check(rewards, mask, alpha))


def _targets(rewards: torch.Tensor, alpha: Alpha, mask: torch.Tensor) -> torch.Tensor:
    """`reward_targets` on arguments that `_check` passed (each loss checks its arguments once)."""
    # The row max is subtracted in the rewards' own precision (float64 rewards: a constant added to them changes
    # nothing), then the differences go to float32
    r = (rewards if rewards.dtype == torch.float64 else rewards.float()).masked_fill(~mask, float("-inf"))
    top = r.max(dim=1, keepdim=True).values
    best = (r == top) & mask
    one_hot = best.float() / best.sum(dim=1, keepdim=True)
    # In float32, as the rewards: an alpha that rounds to 0 there (a float below ~1.4e-45) is the one-hot limit
    alpha = torch.as_tensor(alpha, device=r.device, dtype=torch.float32).expand(r.shape[0]).unsqueeze(1)
    soft_rows = alpha > 0
    # Subtract the row max before dividing, so that no r / alpha overflows whatever the scale of r and alpha; padded
    # slots masked after the division (-inf / alpha = inf is NaN)
    scaled = ((r - top).float() / torch.where(soft_rows, alpha, 1.0)).masked_fill(~mask, float("-inf"))
    soft = torch.softmax(scaled, dim=1).masked_fill(~mask, 0.0)
    return torch.where(soft_rows, soft, one_hot)


def infonca_loss(
    logratios: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    alpha: Alpha,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCA: soft-label K-way cross-entropy between `softmax(beta * logratios)` and `reward_targets`.

    With K = 2 and one-hot targets (alpha = 0, or preference pairs) this is the DPO sigmoid loss
    `-log sigmoid(beta * (l_chosen - l_rejected))`.

    Args:
        logratios (`torch.Tensor` of shape `[B, K]`): `log pi_theta(y|x) - log pi_ref(y|x)`, not multiplied by beta.
        rewards (`torch.Tensor` of shape `[B, K]`): raw rewards.
        beta (`float`): KL coefficient, > 0.
        alpha (`float` or `torch.Tensor` of shape `[B]`): reward temperature, >= 0 (per row if a tensor).
        mask (`torch.Tensor` of shape `[B, K]`, *optional*): True where the completion exists.

    Returns:
        `torch.Tensor` of shape `[B]`, float32: the loss of each prompt.
    """
    mask = _check(rewards, mask, alpha, logratios, beta)
    p = _targets(rewards, alpha, mask)
    g = (beta * logratios.float()).masked_fill(~mask, float("-inf"))
    log_q = torch.log_softmax(g, dim=1).masked_fill(~mask, 0.0)
    return -(p * log_q).sum(dim=1)


def nca_loss(
    logratios: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    alpha: Alpha,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """NCA: each completion is a binary real-vs-noise decision, weighted by the reward targets.

    `- sum_i p_i log sigmoid(g_i) - (1/K) sum_i log sigmoid(-g_i)` with `g = beta * logratios` and K the number of
    valid completions of the row. With K = 2 and one-hot targets this is TRL's `loss_type="nca_pair"`.

    Args:
        logratios (`torch.Tensor` of shape `[B, K]`): `log pi_theta(y|x) - log pi_ref(y|x)`, not multiplied by beta.
        rewards (`torch.Tensor` of shape `[B, K]`): raw rewards.
        beta (`float`): KL coefficient, > 0.
        alpha (`float` or `torch.Tensor` of shape `[B]`): reward temperature, >= 0 (per row if a tensor).
        mask (`torch.Tensor` of shape `[B, K]`, *optional*): True where the completion exists.

    Returns:
        `torch.Tensor` of shape `[B]`, float32: the loss of each prompt.
    """
    mask = _check(rewards, mask, alpha, logratios, beta)
    p = _targets(rewards, alpha, mask)
    g = (beta * logratios.float()).masked_fill(~mask, 0.0)
    k = mask.sum(dim=1, keepdim=True).float()
    positive = -(p * F.logsigmoid(g)).sum(dim=1)
    negative = -(F.logsigmoid(-g).masked_fill(~mask, 0.0) / k).sum(dim=1)
    return positive + negative
