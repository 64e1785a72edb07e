"""The end of `nca-trl iterate`: a table and a plot of the held-out evaluation, one row / point per round."""

from __future__ import annotations

import os

__all__ = ["plot_rounds", "rounds_table"]

_COLUMNS = (("round", "round", "{:d}"), ("train_prompts", "trained on", "{:d}"), ("reward_mean", "mean reward", "{:.4f}"),
            ("reward_best_of_k", "best-of-K", "{:.4f}"), ("kl_to_initial", "KL to initial", "{:.3f}"),
            ("length_mean", "length (tokens)", "{:.1f}"))


def rounds_table(results: list[dict]) -> str:
    """A markdown table: per round, the prompts trained on and the held-out metrics of the policy after it."""
    head = "| " + " | ".join(title for _, title, _ in _COLUMNS) + " |"
    rule = "|" + "|".join("---:" for _ in _COLUMNS) + "|"
    lines = [head, rule]
    for row in results:
        cells = []
        for key, _, fmt in _COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_rounds(results: list[dict], path: str | os.PathLike, title: str = "nca-trl iterate") -> str:
    """Three panels against the round: held-out mean and best-of-K reward, KL to the initial model, length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [row["round"] for row in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(rounds, [row["reward_mean"] for row in results], "o-", label="mean")
    axes[0].plot(rounds, [row["reward_best_of_k"] for row in results], "s--", label="best of K")
    axes[0].set_ylabel("held-out reward")
    axes[0].legend()
    axes[1].plot(rounds, [row["kl_to_initial"] for row in results], "o-")
    axes[1].set_ylabel("KL proxy to the initial model (nats)")
    axes[2].plot(rounds, [row["length_mean"] for row in results], "o-")
    axes[2].set_ylabel("completion length (tokens)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return str(path)
