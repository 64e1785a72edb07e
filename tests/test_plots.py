"""`training_curves.png` and `iterate_curves.png` read at a glance (issue 20): every y axis says its unit, a colour is an
evaluation set and a line style a quantity in every panel and both plots, chance is marked on the ranking accuracy,
the legend covers no panel, and a start/end evaluation is two points, not a line. Fast: synthetic histories, no
training; the checks read the matplotlib Figures the PNGs are drawn from."""

from __future__ import annotations

import re

import pytest
import torch

from nca_trl.iterate.report import build_rounds_figure, plot_rounds
from nca_trl.metrics import sequence_metrics
from nca_trl.train.report import (
    CHANCE_RANKING_ACCURACY,
    build_training_figure,
    plot_training_curves,
)

PNG = b"\x89PNG\r\n\x1a\n"
_METRICS = ("loss", "rewards/margins", "rewards/ranking_accuracy", "logps/chosen", "logps/rejected")


def _metrics(step: int, prefix: str = "", shift: float = 0.0) -> dict:
    return {prefix + "loss": 1.39 - 0.001 * step + shift, prefix + "rewards/margins": 0.005 * step + shift,
            prefix + "rewards/ranking_accuracy": min(0.01 * step + shift, 1.0),
            prefix + "logps/chosen": -430.0 - 0.1 * step + shift, prefix + "logps/rejected": -431.0 - 0.2 * step + shift,
            prefix + "rewards/accuracies": 0.5, prefix + "runtime": 1.0, "step": step, "epoch": step / 10}


def _history(steps: int = 40, eval_steps: tuple = (0, 40), sets: tuple = ("train_prompts", "heldout")) -> list[dict]:
    """A `trainer.state.log_history` as `nca-trl train` logs it: a training entry every 5 steps, one entry per
    evaluation set at each evaluation (`eval_<set>_*`, or `eval_*` for a single unnamed set), a closing summary."""
    history = []
    for step in range(steps + 1):
        if step in eval_steps:
            for i, name in enumerate(sets):
                history.append(_metrics(step, f"eval_{name}_" if name else "eval_", shift=0.01 * i * bool(step)))
        if step and step % 5 == 0:
            history.append(_metrics(step) | {"grad_norm": 0.5, "learning_rate": 1e-3})
    history.append({"train_runtime": 1.0, "train_loss": 1.38, "step": steps, "epoch": steps / 10})
    return history


def _rounds(n: int = 4) -> list[dict]:
    return [{"round": r, "reward_mean": 0.70 + 0.02 * r, "reward_best_of_k": 0.83 + 0.01 * r,
             "kl_to_initial": 0.3 * r, "length_mean": 6.0 - 0.01 * r, "train_prompts": 90 * bool(r)} for r in range(n)]


def _series(fig) -> dict[str, object]:
    """The plotted series by their gid, "<evaluation set>|<quantity>", over all panels: {gid: [Line2D, ...]}."""
    found = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid() and "|" in line.get_gid():
                found.setdefault(line.get_gid(), []).append(line)
    return found


def _axis(fig, ylabel_start: str):
    (ax,) = [ax for ax in fig.axes if ax.get_ylabel().startswith(ylabel_start)]
    return ax


# The checks, each on a Figure


def check_units(fig) -> None:
    for ax in fig.axes:
        assert re.search(r"\(\S[^()]*\)", ax.get_ylabel()), f"no unit in parentheses: {ax.get_ylabel()!r}"


def check_chance(fig) -> None:
    ax = _axis(fig, "ranking accuracy")
    flat = [line for line in ax.get_lines() if len(set(line.get_ydata())) == 1
            and line.get_ydata()[0] == pytest.approx(CHANCE_RANKING_ACCURACY)]
    assert flat, "no horizontal line at chance on the ranking accuracy axis"
    assert list(flat[0].get_xdata()) == [0, 1]  # axhline: across the whole axis
    assert flat[0].get_linestyle() == "--"
    legend_texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert any(text.startswith("chance") for text in legend_texts)


def check_legend_covers_no_axes(fig) -> None:
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)  # the layout engine places axes and legend at draw time
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), "the legend covers a panel"


def check_one_colour_per_set(fig) -> None:
    colours = {}
    for gid, lines in _series(fig).items():
        colours.setdefault(gid.split("|")[0], set()).update(line.get_color() for line in lines)
    assert all(len(c) == 1 for c in colours.values()), colours  # a set has one colour in every panel
    assert len({next(iter(c)) for c in colours.values()}) == len(colours), colours  # sets differ


def check_distinct_quantity_styles(fig, first: str, second: str) -> None:
    """In the panel of two quantities each set draws them in different styles: line styles when they are lines,
    markers always."""
    series = _series(fig)
    for name in {gid.split("|")[0] for gid in series}:
        (a,), (b,) = series[f"{name}|{first}"], series[f"{name}|{second}"]
        assert a.get_marker() != b.get_marker()
        if len(a.get_xdata()) > 2:
            assert a.get_linestyle() != b.get_linestyle() and "None" not in (a.get_linestyle(), b.get_linestyle())


def check_points_not_lines(fig, sets: tuple[str, ...], joined: bool) -> None:
    """The series of `sets`: markers only (`joined` False: two points, start and end), or joined by a line."""
    lines = [line for gid, group in _series(fig).items() if gid.split("|")[0] in sets for line in group]
    assert lines
    for line in lines:
        assert line.get_marker() not in (None, "", "None", " ")
        assert (line.get_linestyle() != "None") is joined, (line.get_gid(), line.get_linestyle())


# training_curves.png


def test_training_curves_axes_say_their_units_and_mark_chance():
    fig = build_training_figure(_history())
    assert len(fig.axes) == 4
    check_units(fig)
    check_chance(fig)
    labels = {ax.get_ylabel() for ax in fig.axes}
    assert {"loss (nats)", "ranking accuracy (fraction of pairs)", "log-prob (nats, summed per sequence)"} <= labels


def test_training_curves_legend_covers_no_panel():
    check_legend_covers_no_axes(build_training_figure(_history()))


def test_training_curves_colour_is_the_set_and_style_the_quantity():
    fig = build_training_figure(_history())
    series = _series(fig)
    # every set is drawn in every panel: the per-step training batches and both evaluation sets
    assert {gid.split("|")[0] for gid in series} == {"training batches", "training prompts", "held-out"}
    assert all(f"held-out|{key}" in series for key in _METRICS)
    check_one_colour_per_set(fig)
    check_distinct_quantity_styles(fig, "logps/chosen", "logps/rejected")
    # a single evaluation set ("eval_" prefix) is the held-out set, in the held-out colour
    colours = {gid: lines[0].get_color() for gid, lines in series.items()}
    single = _series(build_training_figure(_history(sets=("",))))
    assert {lines[0].get_color() for gid, lines in single.items() if gid.startswith("held-out|")} == {
        colours["held-out|loss"]}


def test_training_curves_start_and_end_evaluations_are_two_points():
    fig = build_training_figure(_history())  # eval_on_start and the final evaluation: two points each
    check_points_not_lines(fig, ("training prompts", "held-out"), joined=False)
    check_points_not_lines(fig, ("training batches",), joined=True)
    # evaluations during training (eval_steps) make a curve
    fig = build_training_figure(_history(eval_steps=(0, 10, 20, 30, 40)))
    check_points_not_lines(fig, ("training prompts", "held-out"), joined=True)
    check_distinct_quantity_styles(fig, "logps/chosen", "logps/rejected")


def test_training_curves_png_is_written(tmp_path):
    path = tmp_path / "training_curves.png"
    assert plot_training_curves(_history(), path) == str(path)
    assert path.read_bytes()[:8] == PNG and not list(tmp_path.glob("*.tmp*"))
    assert plot_training_curves([{"train_runtime": 1.0, "step": 0}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_chance_is_what_the_ranking_accuracy_gives_a_random_ordering():
    """`rewards/ranking_accuracy` is the fraction of pairs with r_i > r_j ranked g_i > g_j: a random g gets half of
    them right whatever K is, which is the chance line drawn."""
    generator = torch.Generator().manual_seed(0)
    for k in (2, 4, 8):
        rewards = torch.rand(4000, k, generator=generator)
        g = torch.randn(4000, k, generator=generator)
        metrics = sequence_metrics(g, g, rewards, torch.ones(4000, k, dtype=torch.bool))
        assert (metrics["ranked"].sum() / metrics["pairs"].sum()).item() == pytest.approx(CHANCE_RANKING_ACCURACY, abs=0.01)


# iterate_curves.png


def test_iterate_curves_axes_say_their_units_and_the_legend_covers_no_panel():
    fig = build_rounds_figure(_rounds(), title="nca-trl iterate (nca)")
    assert len(fig.axes) == 3
    check_units(fig)
    check_legend_covers_no_axes(fig)


def test_iterate_curves_use_the_held_out_colour_and_a_style_per_quantity():
    fig = build_rounds_figure(_rounds())
    check_one_colour_per_set(fig)
    check_distinct_quantity_styles(fig, "reward_mean", "reward_best_of_k")
    # the held-out prompts have the same colour as in training_curves.png
    held_out = {lines[0].get_color() for gid, lines in _series(fig).items()}
    training = _series(build_training_figure(_history()))
    assert held_out == {training["held-out|loss"][0].get_color()}


@pytest.mark.parametrize("n, joined", [(1, False), (2, False), (3, True), (5, True)])
def test_iterate_curves_two_rounds_are_two_points(n, joined):
    check_points_not_lines(build_rounds_figure(_rounds(n)), ("held-out",), joined=joined)


def test_iterate_curves_png_is_written(tmp_path):
    path = tmp_path / "iterate_curves.png"
    assert plot_rounds(_rounds(), path, title="nca-trl iterate (nca)") == str(path)
    assert path.read_bytes()[:8] == PNG and not list(tmp_path.glob("*.tmp*"))
