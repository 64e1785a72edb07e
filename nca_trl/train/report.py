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

__all__ = ["LEARNING_METRICS", "eval_set_prefixes", "learning_table", "plot_training_curves", "run_info", "print_summary",
           "write_run_info"]

# (metric, label) rows of the learning table and panels of the PNG
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


def plot_training_curves(log_history: list[dict], path: str | os.PathLike) -> str | None:
    """Training (and evaluation) curves of `LEARNING_METRICS` against the step, one panel each, written to `path`.

    Returns the path, or None if nothing was logged.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [e for e in log_history if "loss" in e and "step" in e]
    prefixes = eval_set_prefixes(k for e in log_history for k in e)
    if not train and not prefixes:
        return None
    series = [(train, "", "-", "train (per batch)")] + [
        ([e for e in log_history if prefix + "loss" in e and "step" in e], prefix, "o--", label)
        for label, prefix in prefixes.items()
    ]
    panels = [("loss", "loss"), ("rewards/margins", "reward margin"), ("rewards/ranking_accuracy", "ranking accuracy")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for ax, (key, title) in zip(axes, panels):
        for entries, prefix, style, name in series:
            points = [(e["step"], e[prefix + key]) for e in entries if prefix + key in e]
            if points:
                ax.plot(*zip(*points), style, label=name, markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    ax = axes[3]
    for key, color in (("logps/chosen", "tab:green"), ("logps/rejected", "tab:red")):
        for entries, prefix, style, name in series:
            points = [(e["step"], e[prefix + key]) for e in entries if prefix + key in e]
            if points:
                ax.plot(*zip(*points), style, color=color, label=f"{key.split('/')[1]} ({name})", markersize=4)
    ax.set_title("sequence log-probs (chosen = best completion)")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


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
        "output_dir": os.path.abspath(trainer.args.output_dir),
        "global_step": trainer.state.global_step,
        "resumed_from": trainer.args.resume_from_checkpoint,
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
    lines = [
        "",
        "=" * 72,
        f"nca-trl: {info['trainer']} finished",
        f"  train loss       : {metrics.get('train_loss', float('nan')):.6f}",
        f"  steps            : {info['global_step']}",
        f"  runtime          : {metrics.get('train_runtime', float('nan')):.1f} s",
        f"  world size       : {info['world_size']} ({dist}; backend {info['backend']})",
        f"  model saved to   : {info['output_dir']}  (AutoModelForCausalLM.from_pretrained)",
        f"  run info         : {os.path.join(info['output_dir'], 'run_info.json')}",
    ]
    for key, value in (info.get("eval_metrics") or {}).items():  # eval_loss, or eval_<set>_loss per evaluation set
        if key.startswith("eval_") and key.endswith("_loss"):
            lines.insert(4, f"  {key.removesuffix('_loss').replace('_', ' ') + ' loss':<17}: {value:.6f}")
    if curves:
        lines.append(f"  training curves  : {curves}")
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
