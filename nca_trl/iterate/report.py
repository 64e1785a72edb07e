"""The end of `nca-trl iterate`: a table and a plot of the held-out evaluation, one row / point per round."""

from __future__ import annotations

import os

__all__ = ["build_rounds_figure", "plot_rounds", "rounds_table"]

_COLUMNS = (("round", "round", "{:d}"), ("train_prompts", "trained on", "{:d}"), ("reward_mean", "mean reward", "{:.4f}"),
            ("reward_best_of_k", "best-of-K", "{:.4f}"), ("kl_to_initial", "KL to initial", "{:.3f}"),
            ("length_mean", "length (tokens)", "{:.1f}"), ("empty_completions", "empty", "{:d}"))


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


# (row key, quantity label, line style, marker) of the reward panel: one style per quantity
_REWARDS = (("reward_mean", "mean reward of the K samples", "-", "o"),
            ("reward_best_of_k", "best of K (mean over prompts of their best reward)", "--", "s"))
# (row key, panel title, y label with its unit) of the other panels, their one quantity drawn solid with circles
_OTHERS = (("kl_to_initial", "how far the policy moved", "KL proxy to the initial model (nats per completion)"),
           ("length_mean", "sampled completion length", "completion length (tokens)"))


def build_rounds_figure(results: list[dict], title: str = "nca-trl iterate"):
    """The Figure of `iterate_curves.png`: three panels against the round (0: the initial model), all measured on the
    held-out prompts (the held-out colour of `training_curves.png`): mean and best-of-K reward, the KL proxy to the
    initial model, the completion length; one legend below the panels."""
    from matplotlib.lines import Line2D

    from ..train.report import draw_series, legend_columns, new_figure, set_color

    rounds = [row["round"] for row in results]
    color = set_color("held-out")
    fig = new_figure(figsize=(13, 4.4))
    axes = fig.subplots(1, 3)
    marks = {"markersize": 7, "markeredgecolor": "black", "markeredgewidth": 0.6, "linewidth": 1.8}
    for key, _, linestyle, marker in _REWARDS:
        draw_series(axes[0], rounds, [row[key] for row in results], color, linestyle, marker, gid=f"held-out|{key}",
                    **marks)
    axes[0].set_title("reward of the policy's samples", fontsize=10)
    axes[0].set_ylabel("reward (scorer's units)")
    for ax, (key, panel_title, ylabel) in zip(axes[1:], _OTHERS):
        draw_series(ax, rounds, [row[key] for row in results], color, "-", "o", gid=f"held-out|{key}", **marks)
        ax.set_title(panel_title, fontsize=10)
        ax.set_ylabel(ylabel)
    for ax in axes:
        ax.set_xlabel("round (0: the initial model)")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
        if len(rounds) == 1:
            ax.set_xlim(rounds[0] - 1, rounds[0] + 1)
    sets = [Line2D([], [], color=color, linestyle="-" if len(rounds) > 2 else "None", marker="o", label="held-out "
                   "prompts (evaluation, the same prompts and seed each round)", **marks)]
    styles = [Line2D([], [], color="0.3", linestyle=linestyle, marker=marker, label=f"reward: {label}")
              for _, label, linestyle, marker in _REWARDS]
    fig.legend(handles=legend_columns(sets, styles), loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    fig.suptitle(title)
    return fig


def plot_rounds(results: list[dict], path: str | os.PathLike, title: str = "nca-trl iterate") -> str:
    """Write `build_rounds_figure(results, title)` to `path` as a PNG (atomically: it is rewritten after each round)."""
    from ..train.report import save_figure

    return save_figure(build_rounds_figure(results, title), path, dpi=110)
