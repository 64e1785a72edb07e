"""What `nca-trl train` tells the user at the end: `run_info.json`, the learning table and the training curves PNG.

The learning table compares the model before and after training on the same prompts: up to
`ScriptArguments.report_train_prompts` training prompts, and the evaluation prompts when there are any. Per-step
training logs are measured on one batch each, before its update, so a table from evaluations is the fair one.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ..runtime.environment import versions
from ..runtime.files import json_default, write_atomic
from ..runtime.models import loader_of

__all__ = ["CHANCE_RANKING_ACCURACY", "LEARNING_METRICS", "SET_COLORS", "build_training_figure", "eval_set_prefixes",
           "learning_table", "plot_training_curves", "print_summary", "run_info", "set_color", "write_run_info"]

# (metric, label) rows of the learning table (the PNG's panels: `_PANELS`)
LEARNING_METRICS = (
    ("loss", "loss"),
    ("rewards/margins", "reward margin (best - others)"),
    ("rewards/ranking_accuracy", "ranking accuracy"),
    ("logps/chosen", "logps/chosen (best completion)"),
    ("logps/rejected", "logps/rejected (others)"),
)
_SET_LABELS = {"train_prompts": "training prompts", "heldout": "held-out"}


def eval_set_prefixes(keys) -> dict[str, str]:
    """`{label: metric prefix}` of the evaluation sets among metric `keys`: `eval_` for a single set (label
    "held-out"), `eval_<name>_` for each set of an eval dict (e.g. `report_train_prompts`'s two)."""
    order = [f"eval_{name}_" for name in _SET_LABELS]  # training prompts first, then held-out, then any other
    prefixes = sorted({k[: -len("loss")] for k in keys if k.startswith("eval_") and k.endswith("_loss")},
                      key=lambda p: (order.index(p) if p in order else len(order), p))
    return {"held-out" if p == "eval_" else _SET_LABELS.get(p[5:-1], p[5:-1].replace("_", " ")): p for p in prefixes}


def learning_table(before: dict[str, dict], after: dict[str, dict]) -> str:
    """Markdown table of `LEARNING_METRICS`, start and end, for each prompt set (`{"training prompts": metrics}`).

    `before[name]` / `after[name]` are `trainer.evaluate(..., metric_key_prefix=p)` results with the prefix removed.
    """
    names = [n for n in before if n in after]
    head = "| metric | " + " | ".join(f"{n}: start | {n}: end" for n in names) + " |"
    lines = [head, "|---" * (1 + 2 * len(names)) + "|"]
    for key, label in LEARNING_METRICS:
        cells = []
        for n in names:
            cells += [_fmt(before[n].get(key)), _fmt(after[n].get(key))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.1f}"


# The plots' vocabulary, shared by `training_curves.png` and `iterate_curves.png`: a colour is an evaluation set (the
# training batches, or a set of evaluation prompts), a line style and marker is a quantity.
SET_COLORS = {"training batches": "tab:blue", "training prompts": "tab:orange", "held-out": "tab:green"}
_MORE_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
#: Chance level of `rewards/ranking_accuracy` (`nca_trl.metrics`: the fraction of completion pairs with r_i > r_j whose
#: implicit rewards are ordered g_i > g_j): a random ordering gets half of the pairs right, whatever K is.
CHANCE_RANKING_ACCURACY = 0.5
CHANCE_STYLE = {"color": "0.45", "linestyle": "--", "linewidth": 1.2}


def set_color(name: str, others: list[str] = ()) -> str:
    """The colour of an evaluation set, the same in every panel and plot; `others`: the names without a fixed colour,
    in the order they take the spare colours."""
    if name in SET_COLORS:
        return SET_COLORS[name]
    extra = [n for n in others if n not in SET_COLORS]
    return _MORE_COLORS[extra.index(name) % len(_MORE_COLORS)] if name in extra else "black"


def draw_series(ax, xs, ys, color: str, linestyle: str, marker: str, markersize: float = 6, **kwargs):
    """A series in its set's colour and its quantity's style (`gid="<set>|<quantity>"` names it). Two points or fewer
    (e.g. the evaluations at the start and the end of a run) are drawn as markers only: a line between two points
    would read as a trend."""
    xs, ys = list(xs), list(ys)
    return ax.plot(xs, ys, color=color, linestyle=linestyle if len(xs) > 2 else "None", marker=marker,
                   markersize=markersize, **kwargs)[0]


def new_figure(**kwargs):
    """A matplotlib Figure drawn by Agg, outside pyplot (no global backend switch, nothing kept alive by pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def legend_columns(left: list, right: list) -> list:
    """Legend handles for `ncols=2`, which fills column by column: `left` (the colours: evaluation sets) in the first
    column, `right` (the styles: quantities, reference lines) in the second, the shorter padded with blank rows."""
    from matplotlib.lines import Line2D

    rows = max(len(left), len(right))

    def blank():
        return Line2D([], [], linestyle="None", label=" ")

    return left + [blank() for _ in range(rows - len(left))] + right + [blank() for _ in range(rows - len(right))]


def save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> str:
    """Write `fig` as a PNG to `path` atomically (`write_atomic`: a reader never sees half a file)."""
    import io

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi, bbox_inches="tight")
    write_atomic(path, png.getvalue())
    return str(path)


# The panels of the PNG: (title, y label with its unit, the quantities drawn [(metric, quantity)]). The implicit reward
# is g = beta * (log pi - log pi_ref) of a whole sequence (`nca_trl.metrics`), the log-probs are sums over its tokens.
_PANELS = (
    ("loss (what is minimised)", "loss (nats)", (("loss", None),)),
    ("implicit reward margin: best completion - mean of the others", "reward margin (β × nats)",
     (("rewards/margins", None),)),
    ("pairwise ranking accuracy", "ranking accuracy (fraction of pairs)", (("rewards/ranking_accuracy", None),)),
    ("policy log-probs of the completions", "log-prob (nats, summed per sequence)",
     (("logps/chosen", "chosen"), ("logps/rejected", "rejected"))),
)
# quantity -> (line style, marker); None: the panel's only quantity
_QUANTITY_STYLES = {None: ("-", "o"), "chosen": ("-", "^"), "rejected": (":", "v")}
_QUANTITY_LABELS = {"chosen": "chosen = best completion", "rejected": "rejected = mean of the others"}


def _eval_marker_size(index: int) -> float:
    """Marker size of the `index`-th evaluation set: each smaller than the one before, so that points of equal value
    read as concentric rings rather than one hiding the other."""
    return max(10.0 - 3.0 * index, 4.5)


def build_training_figure(log_history: list[dict]):
    """The Figure of `training_curves.png`: `LEARNING_METRICS` against the step, one panel each (chosen and rejected
    log-probs share one), one colour per evaluation set, one line style per quantity, and one legend below the panels.

    Returns None if nothing was logged.
    """
    from matplotlib.lines import Line2D

    train = [e for e in log_history if "loss" in e and "step" in e]
    prefixes = eval_set_prefixes(k for e in log_history for k in e)
    if not train and not prefixes:
        return None
    names = list(prefixes)
    # (entries, metric prefix, set name, legend label, per-batch?)
    series = ([(train, "", "training batches", "training batches (one batch per logged step, before its update)", True)]
              if train else [])
    series += [([e for e in log_history if prefix + "loss" in e and "step" in e], prefix, name,
                f"{'held-out prompts' if name == 'held-out' else name} (evaluation)", False)
               for name, prefix in prefixes.items()]
    fig = new_figure(figsize=(12, 8.2))
    axes = fig.subplots(2, 2, sharex=True).ravel()
    drawn_sets, drawn_quantities = {}, set()
    for ax, (title, ylabel, quantities) in zip(axes, _PANELS):
        for quantity_key, quantity in quantities:
            linestyle, marker = _QUANTITY_STYLES[quantity]
            for entries, prefix, name, label, per_batch in series:
                points = [(e["step"], e[prefix + quantity_key]) for e in entries if prefix + quantity_key in e]
                if not points:
                    continue
                color = set_color(name, names)
                if per_batch:  # many noisy points: a thin line, small markers while they stay readable
                    draw_series(ax, *zip(*points), color, linestyle, marker if len(points) <= 40 else "None",
                                markersize=3.5, linewidth=1.2, alpha=0.85, zorder=2, gid=f"{name}|{quantity_key}")
                else:  # sets evaluated at the same steps often start at the same value: the later drawn smaller
                    size = _eval_marker_size(names.index(name))
                    draw_series(ax, *zip(*points), color, linestyle, marker, markersize=size, linewidth=1.8,
                                markeredgecolor="black", markeredgewidth=0.6, zorder=3 + names.index(name),
                                gid=f"{name}|{quantity_key}")
                joined = drawn_sets.get(label, (None, None, None, False))[3] or len(points) > 2
                drawn_sets[label] = (color, per_batch, None if per_batch else _eval_marker_size(names.index(name)),
                                     joined)
                if quantity:
                    drawn_quantities.add(quantity)
        if quantities[0][0] == "rewards/ranking_accuracy":  # chance: a random ordering of the completions
            ax.axhline(CHANCE_RANKING_ACCURACY, zorder=1, gid="chance", **CHANCE_STYLE)
            ax.set_ylim(-0.03, 1.03)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("training step (optimizer updates)")
    sets = [Line2D([], [], color=color, linestyle="-", marker="o", markersize=3.5, label=label) if per_batch else
            Line2D([], [], color=color, linestyle="-" if joined else "None", linewidth=1.8, marker="o",
                   markersize=size, markeredgecolor="black", markeredgewidth=0.6, label=label)
            for label, (color, per_batch, size, joined) in drawn_sets.items()]
    styles = [Line2D([], [], color="0.3", linestyle=_QUANTITY_STYLES[q][0], marker=_QUANTITY_STYLES[q][1],
                     label=f"log-probs: {_QUANTITY_LABELS[q]}") for q in ("chosen", "rejected") if q in drawn_quantities]
    styles.append(Line2D([], [], label=f"chance ({CHANCE_RANKING_ACCURACY:g}, a random ordering)", **CHANCE_STYLE))
    fig.legend(handles=legend_columns(sets, styles), loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    fig.suptitle("nca-trl train: learning curves (evaluation sets drawn as points at the steps they were evaluated)",
                 fontsize=11)
    return fig


def plot_training_curves(log_history: list[dict], path: str | os.PathLike) -> str | None:
    """Write `build_training_figure(log_history)` to `path` as a PNG. Returns the path, or None if nothing was
    logged."""
    fig = build_training_figure(log_history)
    return None if fig is None else save_figure(fig, path)


def run_info(trainer, model_args, train_metrics: dict, eval_metrics: dict | None, started: float,
             distributed: dict, settings: dict | None = None) -> dict:
    """The content of `run_info.json`: what ran (`settings`: `nca_trl.train.arguments.run_settings`), where, with
    which versions, and what it logged."""
    history = trainer.state.log_history
    return {
        "settings": settings,
        **distributed,
        "loss": trainer.loss_name,  # the loss trained, as the trainer's saved arguments say (`loss_type`)
        "loss_type": list(trainer.args.loss_type),
        "trainer": type(trainer).__name__,
        "model_name_or_path": model_args.model_name_or_path,
        "model_loader": loader_of(trainer.accelerator.unwrap_model(trainer.model)),  # what loads the saved model
        "output_dir": os.path.abspath(trainer.args.output_dir),
        "global_step": trainer.state.global_step,
        "resumed_from": getattr(trainer, "_nca_resumed_from", trainer.args.resume_from_checkpoint),  # the folder
        "step_losses": [{"step": e["step"], "loss": e["loss"]} for e in history if "loss" in e and "step" in e],
        "log_history": history,
        "train_metrics": train_metrics,
        "eval_metrics": eval_metrics,
        "versions": versions(),
        "wall_time_s": time.time() - started,
    }


def write_run_info(info: dict, output_dir: str | os.PathLike) -> Path:
    path = Path(output_dir) / "run_info.json"
    write_atomic(path, json.dumps(info, indent=1, default=json_default))
    return path


def print_summary(info: dict, table: str | None, curves: str | None) -> None:
    dist = info["distributed_type"] + (f", ZeRO-{info['zero_stage']}" if info["zero_stage"] is not None else "")
    metrics = info["train_metrics"]
    # eval_loss, or eval_<set>_loss per evaluation set, in the order they were evaluated
    evals = [(key.removesuffix("_loss").replace("_", " ") + " loss", f"{value:.6f}")
             for key, value in (info.get("eval_metrics") or {}).items()
             if key.startswith("eval_") and key.endswith("_loss")]
    fields = [
        ("train loss", f"{metrics.get('train_loss', float('nan')):.6f}"),
        *evals,
        ("steps", info["global_step"]),
        ("runtime", f"{metrics.get('train_runtime', float('nan')):.1f} s"),
        ("world size", f"{info['world_size']} ({dist}; backend {info['backend']})"),
        ("model saved to", f"{info['output_dir']}  ({info['model_loader']}.from_pretrained)"),
        ("run info", os.path.join(info["output_dir"], "run_info.json")),
    ]
    if curves:
        fields.append(("training curves", os.path.abspath(curves)))  # the full path, as the others
    width = max(16, *(len(label) for label, _ in fields))  # the colons in one column
    lines = ["", "=" * 72, f"nca-trl: {info['trainer']} finished"]
    lines += [f"  {label:<{width}} : {value}" for label, value in fields]
    if table:
        lines += [
            "",
            "What changed, start -> end (the same prompts, evaluated before and after training):",
            table,
            "(At the start the policy is its reference: every implicit reward is 0, so the margin is 0 and no pair is",
            "ranked yet. Chance ranking accuracy is 0.5.)",
        ]
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)
