"""The figures (`likelihood_trend*.png`, `ground_truth_reward.png`, `ground_truth_sensitivity.png`) and the tables of
`summary.md`, drawn from the results of the experiments (the dict written to results.json)."""

from __future__ import annotations

from .common import METHODS
from .trend import lr_key

COLORS = {"SFT": "#7f7f7f", "DPO": "#1f77b4", "InfoNCA": "#ff7f0e", "NCA": "#2ca02c", "NCA offline": "#9467bd"}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, dpi):
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_trend(trend, cfg, lr, path):
    import numpy as np

    plt = pyplot()
    entry = trend["by_lr"][lr_key(lr)]
    sets = (("heldout", "held-out prompts"), ("train", "training prompts"))
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4), sharex=True)
    for row, (name, label) in enumerate(sets):
        for col, method in enumerate(METHODS):
            ax = axes[row, col]
            runs = list(entry["runs"][method].values())
            steps = np.array(runs[0]["steps"])
            for key, style in (("chosen", "-"), ("rejected", "--")):
                vals = np.array([r[name][key] for r in runs])
                m = vals.mean(0)
                s = vals.std(0, ddof=1) if len(runs) > 1 else np.zeros(vals.shape[1])
                ax.plot(steps, m, style, color=COLORS[method], label=key)
                ax.fill_between(steps, m - s, m + s, color=COLORS[method], alpha=0.2)
            ch = entry["summary"][method][f"{name}_chosen_change"]
            ax.set_title(f"{method}, {label}: chosen {ch['mean']:+.0f} ± {ch['std']:.0f}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(loc="lower left", fontsize=8)
            if row == 1:
                ax.set_xlabel("training step")
        axes[row, 0].set_ylabel(f"log-likelihood, {label}\n(nats / sequence)")
        runs = [r for m in METHODS for r in entry["runs"][m].values()]
        values = [v for r in runs for k in ("chosen", "rejected") for v in r[name][k]]
        lo, hi = min(values), max(values)
        pad = 0.05 * (hi - lo + 1e-9)
        for ax in axes[row]:
            ax.set_ylim(lo - pad, hi + pad)
    n = len(entry["runs"]["DPO"])
    fig.suptitle(
        f"Log-likelihood of the chosen (best) and rejected (worst) completions while training from one SFT checkpoint "
        f"(beta={cfg['beta']}, alpha={cfg['alpha']}, lr={lr:g}, batch {cfg['batch_size']} prompts, "
        f"{n} seed(s), mean ± std)",
        fontsize=9,
    )
    save(fig, path, 80)


def plot_reward(reward, cfg, path):
    plt = pyplot()

    names = ["SFT", *METHODS]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, key, label in zip(axes, ("reward", "exact_match"), ("mean true reward (greedy)", "exact match (greedy)")):
        summ = [reward["summary"][n][key] for n in names]
        ax.bar(names, [s["mean"] for s in summ], yerr=[s["std"] for s in summ], capsize=4,
               color=[COLORS[n] for n in names])
        for i, s in enumerate(summ):
            ax.scatter([i] * len(s["values"]), s["values"], color="k", s=8, zorder=3)
            ax.text(i, s["mean"] + s["std"] + 0.01, f"{s['mean']:.3f}", ha="center", fontsize=8)
        ax.set_ylabel(label)
        lo = min(min(s["values"]) for s in summ)
        ax.set_ylim(max(0.0, lo - 0.1), min(1.05, max(s["mean"] + s["std"] for s in summ) + 0.06))
        ax.grid(axis="y", alpha=0.3)
    n_seeds = len(reward["per_seed"])
    fig.suptitle(
        f"Sorting {cfg['num_digits']} digits, {cfg['num_heldout']} held-out prompts, K={cfg['k']} samples, "
        f"lr={cfg['lr']:g}, beta={cfg['beta']:g}, alpha={cfg['alpha']:g}: mean ± std over {n_seeds} seed(s) "
        "(dots: seeds)",
        fontsize=9,
    )
    save(fig, path, 90)


def plot_reward_grid(reward, path):
    import numpy as np

    plt = pyplot()
    keys = list(reward["grid_summary"])
    x = np.arange(len(keys))
    width = 0.26
    fig, ax = plt.subplots(figsize=(9, 3.4))
    for j, m in enumerate(METHODS):
        summ = [reward["grid_summary"][k][m]["reward"] for k in keys]
        ax.bar(x + (j - 1) * width, [s["mean"] for s in summ], width, yerr=[s["std"] for s in summ], capsize=3,
               color=COLORS[m], label=m)
    sft = reward["summary"]["SFT"]["reward"]
    ax.axhline(sft["mean"], color=COLORS["SFT"], ls="--", label=f"SFT ({sft['mean']:.3f})")
    ax.set_xticks(x, [k.replace(",", "\n") + ("\n(main)" if k == reward["main_setting"] else "") for k in keys],
                  fontsize=8)
    ax.set_ylabel("mean true reward (greedy)")
    lo = min(reward["grid_summary"][k][m]["reward"]["mean"] for k in keys for m in METHODS)
    ax.set_ylim(max(0.0, min(lo, sft["mean"]) - 0.08), 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    ax.set_title(f"Sorting task: every method at every (lr, beta), same SFT model and samples; mean ± std over "
                 f"{len(reward['per_seed'])} seed(s)", fontsize=9)
    save(fig, path, 80)


def summary_markdown(results):
    lines = []
    if "identity" in results:
        lines.append("### Identity: InfoNCA (K=2, alpha=0) vs DPO sigmoid\n")
        lines.append("| data | pairs | loss fn: max abs loss diff | loss fn: max abs grad diff | trainer, padded "
                     "layout: max abs loss diff | padded: max abs param-grad diff (relative) | trainer, shared-prompt "
                     "layout: max abs loss diff | shared-prompt: max abs param-grad diff (relative) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for src in results["identity"]["sources"]:
            r = results["identity"][src]
            ll = max(v["max_abs_loss_diff"] for v in r["loss_level"].values())
            lg = max(v["max_abs_grad_diff"] for v in r["loss_level"].values())
            t, t64 = r["trainer_level"]["padded"], r["trainer_level"]["shared_prompt"]
            lines.append(f"| {src} | {r['num_pairs']} | {ll:.1e} | {lg:.1e} | {t['max_abs_loss_diff']:.1e} | "
                         f"{t['max_abs_grad_diff']:.1e} ({t['max_rel_grad_diff']:.1e}) | "
                         f"{t64['max_abs_loss_diff']:.1e} | "
                         f"{t64['max_abs_grad_diff']:.1e} ({t64['max_rel_grad_diff']:.1e}) |")
        lines.append("")
    if "trend" in results:
        tr = results["trend"]
        lines.append("### Likelihood trend: change of log-likelihood (nats/sequence) from the SFT checkpoint to the "
                     "end of training\n")
        lines.append("| lr | method | held-out chosen | held-out rejected | training-prompt chosen | "
                     "training-prompt rejected | held-out chosen per seed | training-prompt chosen per seed |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for (key, entry), m in ((kv, m) for kv in tr["by_lr"].items() for m in METHODS):
            summ = entry["summary"][m]
            cells = [f"{summ[k]['mean']:+.1f} ± {summ[k]['std']:.1f}" for k in (
                "heldout_chosen_change", "heldout_rejected_change", "train_chosen_change", "train_rejected_change")]
            per_seed = [", ".join(f"{v:+.1f}" for v in summ[k]["values"])
                        for k in ("heldout_chosen_change", "train_chosen_change")]
            main = " (main)" if key == tr["main_lr"] else ""
            lines.append(f"| {entry['lr']:g}{main} | {m} | {' | '.join(cells)} | {' | '.join(per_seed)} |")
        lines.append("")
    if "reward" in results:
        rw = results["reward"]
        lines.append("### Ground-truth reward task (sorting): greedy outputs on held-out prompts\n")
        lines.append("| model | mean true reward | exact match | per-seed reward |")
        lines.append("|---|---|---|---|")
        for m in ("SFT", *METHODS):
            s, e = rw["summary"][m]["reward"], rw["summary"][m]["exact_match"]
            lines.append(f"| {m} | {s['mean']:.3f} ± {s['std']:.3f} | {e['mean']:.3f} ± {e['std']:.3f} | "
                         f"{', '.join(f'{v:.3f}' for v in s['values'])} |")
        lines.append("")
        sft = rw["summary"]["SFT"]
        lines.append("Sensitivity (mean true reward ± std over seeds; exact match in brackets; SFT "
                     f"{sft['reward']['mean']:.3f} [{sft['exact_match']['mean']:.3f}]):\n")
        lines.append("| setting | " + " | ".join(METHODS) + " |")
        lines.append("|---|" + "---|" * len(METHODS))
        for key, by_method in rw["grid_summary"].items():
            cells = [f"{by_method[m]['reward']['mean']:.3f} ± {by_method[m]['reward']['std']:.3f} "
                     f"[{by_method[m]['exact_match']['mean']:.3f}]" for m in METHODS]
            main = " (main)" if key == rw["main_setting"] else ""
            lines.append(f"| {key}{main} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Paired difference to DPO (same seed: same SFT model, samples and held-out prompts), true reward "
                     "[exact match], mean ± std over seeds:\n")
        lines.append("| setting | InfoNCA - DPO | NCA - DPO |")
        lines.append("|---|---|---|")
        for key, by_method in rw["paired_difference_vs_DPO"].items():
            cells = [f"{by_method[m]['reward']['mean']:+.3f} ± {by_method[m]['reward']['std']:.3f} "
                     f"[{by_method[m]['exact_match']['mean']:+.3f} ± {by_method[m]['exact_match']['std']:.3f}]"
                     for m in ("InfoNCA", "NCA")]
            main = " (main)" if key == rw["main_setting"] else ""
            lines.append(f"| {key}{main} | " + " | ".join(cells) + " |")
        lines.append("")
    if "iterative" in results:
        lines += iterative_markdown(results["iterative"])
    if "ablation" in results:
        lines += ablation_markdown(results["ablation"])
    return "\n".join(lines)


def _gains(it, name):
    """Per round, the held-out reward minus the same seed's SFT reward (round 0): mean_std over seeds."""
    from .common import mean_std

    runs = [seed["rounds"][name] for seed in it["per_seed"].values()]
    return [mean_std([run[i]["reward_mean"] - run[0]["reward_mean"] for run in runs]) for i in range(len(runs[0]))]


def iterative_markdown(it):
    """Per method and round, the held-out true reward of the policy's samples (mean ± std over seeds, per seed)."""
    lines = ["### Iterative training (nca-trl iterate) on the sorting task: held-out true reward of the policy's "
             "samples per round\n", "| method | round | prompts trained on | mean reward | gain over SFT (paired) | "
             "best of K | KL to SFT | per-seed mean reward |", "|---|---|---|---|---|---|---|---|"]
    first_seed = next(iter(it["per_seed"].values()))["rounds"]
    for name, rows in it["summary"].items():
        for i, (row, gain) in enumerate(zip(rows, _gains(it, name))):
            trained = first_seed[name][i]["train_prompts"]
            r, b, kl = row["reward_mean"], row["reward_best_of_k"], row["kl_to_initial"]
            lines.append(f"| {name} | {row['round']} | {trained} | {r['mean']:.3f} ± {r['std']:.3f} | "
                         f"{gain['mean']:+.3f} ± {gain['std']:.3f} | {b['mean']:.3f} ± {b['std']:.3f} | "
                         f"{kl['mean']:.2f} ± {kl['std']:.2f} | {', '.join(f'{v:.3f}' for v in r['values'])} |")
    lines += ["", "Final round minus iterative DPO's final round, paired by seed (mean ± std): " + "; ".join(
        f"{name} {d['mean']:+.3f} ± {d['std']:.3f}" for name, d in it["paired_final_vs_DPO"].items()), ""]
    return lines


def plot_iterative(it, path):
    """Against the round: the held-out true reward gain over the seed's SFT model (paired by seed), and the KL proxy
    to the SFT model; mean over seeds, std as a band, one line per method."""
    import numpy as np

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    last = max(row["round"] for row in it["summary"]["NCA"])
    for ax, label in zip(axes, ("held-out true reward gain over SFT", "KL proxy to the SFT model (nats)")):
        for name, rows in it["summary"].items():
            offline = name.endswith("offline")
            # one round on all the prompts: drawn at the last round, where the others have seen as many prompts
            rounds = [0, last] if offline else [row["round"] for row in rows]
            series = _gains(it, name) if ax is axes[0] else [row["kl_to_initial"] for row in rows]
            mean = np.array([v["mean"] for v in series])
            std = np.array([v["std"] for v in series])
            ax.plot(rounds, mean, "s--" if offline else "o-", color=COLORS.get(name), label=name)
            ax.fill_between(rounds, mean - std, mean + std, color=COLORS.get(name), alpha=0.12)
        ax.set_xlabel("round (prompts seen)")
        ax.set_xticks(range(last + 1))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Iterative training, sorting task: mean ± std over {len(it['per_seed'])} seed(s)", fontsize=10)
    save(fig, path, 110)


def _ci(d):
    ci = d.get("ci95")
    return f"{d['mean']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else f"{d['mean']:+.3f}"


def ablation_markdown(ab):
    """Per arm and round: held-out true reward (mean ± std), the paired difference to the task's iterative DPO with
    its 95% interval, prompts and optimizer steps trained on; then the decisions of the plan."""
    n = len(ab["per_seed"])
    title = (f"### Ablation (pre-registered: {ab['plan']}): held-out true reward of the policy's samples per round, "
             f"{n} seed(s)\n")
    header = ("| arm | task | round | mean reward | minus the task's DPO, paired [95% interval] | best of K | "
              "KL to SFT | prompts trained on | optimizer steps | tied prompts dropped |")
    tasks = "Tasks: " + "; ".join(f"`{t}`: {d}" for t, d in ab["tasks"].items()) + "\n"
    lines = [title, tasks, header, "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in ab["summary"].items():
        task = ab["arms"][name]["task"]
        for i, row in enumerate(rows):
            diff = ab["paired_vs_DPO"].get(name, [None] * len(rows))[i]
            r, b, kl = row["reward_mean"], row["reward_best_of_k"], row["kl_to_initial"]
            lines.append(f"| {name} | {task} | {row['round']} | {r['mean']:.3f} ± {r['std']:.3f} | "
                         f"{_ci(diff) if diff else 'baseline'} | {b['mean']:.3f} ± {b['std']:.3f} | "
                         f"{kl['mean']:.2f} ± {kl['std']:.2f} | {row['train_prompts']['mean']:.0f} | "
                         f"{row['train_steps']['mean']:.0f} | {row['ties_dropped']['mean']:.0f} |")
    d = ab["decisions"]
    ties, ref, steps = d["ties"], d["reference"], d["dpo_matched_steps_minus_dpo"]
    lines += ["", "Decisions (final round, paired by seed, 95% interval):", "",
              (f"- ties: dropped minus kept (mean of NCA and InfoNCA on both tasks) {_ci(ties['dropped_minus_kept'])} "
               f"-> {ties['verdict']}; default `ties: {ties['default']}`"),
              (f"- reference: previous minus initial (NCA, main) {_ci(ref['previous_minus_initial'])} -> "
               f"{ref['verdict']}; default `reference: {ref['default']}`"),
              f"- DPO with NCA's optimizer steps minus DPO {_ci(steps)} -> {steps['verdict']}"]
    for name, by in d["all_k_vs_best_vs_worst"].items():
        lines.append(f"- {name} vs " + "; vs ".join(f"{b}: {_ci(v)} -> {v['verdict']}" for b, v in by.items()))
    beats = d["all_k_arms_that_beat_every_dpo_baseline"]
    lines += [f"- all-K arms that beat every best-vs-worst baseline of their task: {', '.join(beats) or 'none'}", ""]
    return lines


def plot_ablation(ab, path):
    """One panel per task: each arm's held-out reward minus the task's iterative DPO, paired by seed, per round
    (offline arms: at the last round, the same prompts seen), mean with its 95% interval; zero is DPO."""
    plt = pyplot()
    tasks = list(ab["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), sharey=True, squeeze=False)
    cmap = plt.get_cmap("tab10")
    bases = list(dict.fromkeys(n.removeprefix("hard: ") for n in ab["paired_vs_DPO"]))  # one colour per arm kind
    handles = {}
    for ax, task in zip(axes[0], tasks):
        arms = [n for n in ab["paired_vs_DPO"] if ab["arms"][n]["task"] == task]
        last = max(r["round"] for r in ab["summary"][next(iter(arms))])
        for j, name in enumerate(arms):
            rows = ab["paired_vs_DPO"][name]
            x = [r["against_round"] + (j - len(arms) / 2) * 0.03 for r in rows]
            y = [r["mean"] for r in rows]
            err = [[r["mean"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["mean"] for r in rows]] \
                if all(r["ci95"] for r in rows) else None
            offline = ab["arms"][name]["offline"]
            h = ax.errorbar(x, y, yerr=err, fmt="s" if offline else "o", ls="none" if offline else "-",
                            color=cmap(bases.index(name.removeprefix("hard: ")) % 10), capsize=3, ms=5, label=name.removeprefix("hard: "))
            handles.setdefault(task, []).append(h)
        ax.axhline(0, color="k", lw=1, ls="--")
        ax.set_xticks(range(last + 1))
        ax.set_xlabel("round (offline arms: one round on all the prompts, drawn at the last)")
        ax.set_title(f"task `{task}`: {ab['tasks'][task]}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(handles=handles[task], fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.18), ncol=2)
    axes[0][0].set_ylabel("held-out true reward minus the task's DPO\n(fraction of positions right; 0 = DPO)")
    fig.suptitle(f"Ablation: paired difference to iterative DPO, mean and 95% interval over "
                 f"{len(ab['per_seed'])} seed(s)", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
