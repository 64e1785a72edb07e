"""Experiment 5, `ablation`: when does keeping all K rated completions pay? The pre-registered plan is
`results/ablation/PLAN.md` (committed before any of its results); this module runs exactly its arms.

Every arm is a run of `nca-trl iterate` on the digit-sorting task (the exact reward as the scorer, the `iterative`
experiment's recipe) from the same SFT checkpoint per seed and task, so that arms are paired by seed: the same SFT
model, training prompts and held-out prompts. Two tasks: `main` (the `iterative` experiment's setting, SFT near the
ceiling) and `hard` (longer digit strings, less SFT, so that gains have room). `ARMS` names each arm's task, loss,
whether it is offline (one round on every round's prompts, sampled from the SFT model) and its changes to the recipe.

Reported per arm and round: the held-out true reward of the policy's samples (mean, best of K), the KL proxy to the
SFT model, the prompts and optimizer steps trained on; mean +- std over seeds and the paired difference to the task's
iterative DPO with a 95% t-interval. `decide()` applies the plan's decision rules to the final round.
"""

from __future__ import annotations

import math
import time

from .common import mean_std
from .iterative import _recipe, sft_start

METRICS = ("reward_mean", "reward_best_of_k", "kl_to_initial", "train_prompts", "train_steps", "ties_dropped")
PRIMARY = "reward_mean"

# name -> (task, loss, offline, top-level recipe changes, `training:` changes). "{steps}" is the number of optimizer
# steps an NCA round takes on all its prompts (epochs x ceil(prompts_per_round / batch_size)).
ARMS = {
    "DPO": ("main", "dpo", False, {}, {}),
    "DPO beta=1": ("main", "dpo", False, {}, {"beta": 1.0}),
    "DPO matched steps": ("main", "dpo", False, {}, {"max_steps": "{steps}"}),
    "NCA": ("main", "nca", False, {}, {}),
    "NCA ties dropped": ("main", "nca", False, {}, {"ties": "drop"}),
    "InfoNCA": ("main", "infonca", False, {}, {}),
    "InfoNCA ties dropped": ("main", "infonca", False, {}, {"ties": "drop"}),
    "NCA reference previous": ("main", "nca", False, {"reference": "previous"}, {}),
    "DPO offline": ("main", "dpo", True, {}, {}),
    "NCA offline": ("main", "nca", True, {}, {}),
    "hard: DPO": ("hard", "dpo", False, {}, {}),
    "hard: NCA": ("hard", "nca", False, {}, {}),
    "hard: NCA ties dropped": ("hard", "nca", False, {}, {"ties": "drop"}),
    "hard: InfoNCA": ("hard", "infonca", False, {}, {}),
    "hard: InfoNCA ties dropped": ("hard", "infonca", False, {}, {"ties": "drop"}),
}
BASELINE = {"main": "DPO", "hard": "hard: DPO"}
# Two-sided 95% quantiles of Student's t by degrees of freedom (n - 1); 1.96 beyond the table
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 29: 2.045}


def paired_interval(differences):
    """Mean, std and the 95% t-interval of paired differences (one per seed); `ci95` is None for a single seed.

    >>> paired_interval([0.01, 0.03])["ci95"]
    [-0.10706, 0.14706]
    """
    summary = mean_std(differences)
    n = len(summary["values"])
    if n < 2:
        return {**summary, "ci95": None}
    df = n - 1
    t = T975[max(k for k in T975 if k <= df)] if df <= 29 else 1.96  # between table entries: the larger t
    half = t * summary["std"] / math.sqrt(n)
    return {**summary, "ci95": [round(summary["mean"] - half, 6), round(summary["mean"] + half, 6)]}


def verdict(interval):
    """`better` / `worse` when the 95% interval excludes 0, else `no detectable difference` (None: one seed)."""
    ci = interval["ci95"]
    if ci is None:
        return None
    return "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "no detectable difference"


def task_settings(cfg, task):
    """The `iterative` experiment's settings with the task's changes applied."""
    merged = {k: v for k, v in cfg.items() if k not in ("tasks", "seeds")}
    return {**merged, **cfg["tasks"][task]}


def arm_recipe(cfg, task, name, seed, model, prompts_file, out):
    _, loss, offline, top, training = ARMS[name]
    tcfg = task_settings(cfg, task)
    rounds, per_round = (1, tcfg["rounds"] * tcfg["prompts_per_round"]) if offline else \
        (tcfg["rounds"], tcfg["prompts_per_round"])
    recipe = _recipe(tcfg, seed, model, prompts_file, out, loss, rounds, per_round)
    steps = tcfg["epochs"] * math.ceil(tcfg["prompts_per_round"] / tcfg["batch_size"])
    recipe.update(top)
    recipe["training"].update({k: steps if v == "{steps}" else v for k, v in training.items()})
    return recipe


def run_ablation(cfg, seeds, work):
    """Every arm of `ARMS` for every seed; the `ablation` part of results.json."""
    import yaml

    from nca_trl.iterate import iterate

    result = {"plan": "results/ablation/PLAN.md", "primary_metric": PRIMARY,
              "tasks": {t: "sort {num_digits} digits, {num_demos} SFT demonstrations, {sft_steps} SFT steps".format(
                  **task_settings(cfg, t)) for t in cfg["tasks"]},
              "arms": {name: {"task": a[0], "loss": a[1], "offline": a[2], "recipe": a[3], "training": a[4]}
                       for name, a in ARMS.items()},
              "per_seed": {}}
    for seed in seeds:
        t0 = time.time()
        per_arm = {}
        for task in cfg["tasks"]:
            sft_path, prompts_file = sft_start(task_settings(cfg, task), seed, work, f"abl-{task}")
            for name in (n for n, a in ARMS.items() if a[0] == task):
                slug = name.replace(":", "").replace(" ", "_").replace("=", "")
                out, recipe = work / f"abl-{seed}-{slug}", work / f"abl-{seed}-{slug}.yaml"
                recipe.write_text(yaml.safe_dump(arm_recipe(cfg, task, name, seed, sft_path, prompts_file, out)))
                summary = iterate(["--config", str(recipe)])
                per_arm[name] = [{"round": row["round"], **{k: row.get(k, 0) for k in METRICS}}
                                 for row in summary["rounds"]]
        result["per_seed"][str(seed)] = {"rounds": per_arm, "seconds": time.time() - t0}
        final = ", ".join(f"{m} {rows[-1][PRIMARY]:.3f}" for m, rows in per_arm.items())
        print(f"[ablation] seed {seed} ({time.time() - t0:.0f}s): final held-out true reward: {final}", flush=True)
    result["summary"], result["paired_vs_DPO"] = summarize(result["per_seed"], seeds)
    result["decisions"] = decide(result["per_seed"], seeds)
    return result


def _runs(per_seed, seeds, name):
    return [per_seed[str(s)]["rounds"][name] for s in seeds]


def summarize(per_seed, seeds):
    """Per arm and round: mean_std over seeds of every metric, and the paired difference of the primary metric to
    the task's iterative DPO (offline arms: their round 1 against DPO's last round, the same prompts seen)."""
    summary, paired = {}, {}
    for name, (task, *_rest) in ARMS.items():
        runs, base = _runs(per_seed, seeds, name), _runs(per_seed, seeds, BASELINE[task])
        summary[name] = [{"round": runs[0][i]["round"], **{k: mean_std([run[i][k] for run in runs]) for k in METRICS}}
                         for i in range(len(runs[0]))]
        if name == BASELINE[task]:
            continue
        offline = ARMS[name][2]
        paired[name] = [
            {"round": runs[0][i]["round"], "against_round": (len(base[0]) - 1 if offline and i else i),
             **paired_interval([run[i][PRIMARY] - b[len(b) - 1 if offline and i else i][PRIMARY]
                                for run, b in zip(runs, base)])}
            for i in range(len(runs[0]))
        ]
    return summary, paired


def _final_difference(per_seed, seeds, arm, against):
    return [per_seed[str(s)]["rounds"][arm][-1][PRIMARY] - per_seed[str(s)]["rounds"][against][-1][PRIMARY]
            for s in seeds]


def decide(per_seed, seeds):
    """The plan's decision rules (results/ablation/PLAN.md, "Decisions"), on the final round's held-out reward."""
    pairs = [("NCA ties dropped", "NCA"), ("InfoNCA ties dropped", "InfoNCA"),
             ("hard: NCA ties dropped", "hard: NCA"), ("hard: InfoNCA ties dropped", "hard: InfoNCA")]
    # Q1: one value per seed, the mean of the four (dropped - kept) differences of that seed
    per_pair = [_final_difference(per_seed, seeds, a, b) for a, b in pairs]
    ties = paired_interval([sum(v) / len(v) for v in zip(*per_pair)])
    reference = paired_interval(_final_difference(per_seed, seeds, "NCA reference previous", "NCA"))
    all_k = {}
    for name, (task, loss, *_rest) in ARMS.items():
        if loss == "dpo":
            continue
        against = [BASELINE[task]] + (["DPO beta=1"] if task == "main" else [])
        intervals = {b: paired_interval(_final_difference(per_seed, seeds, name, b)) for b in against}
        all_k[name] = {b: {**interval, "verdict": verdict(interval)} for b, interval in intervals.items()}
    steps = paired_interval(_final_difference(per_seed, seeds, "DPO matched steps", "DPO"))
    beats = sorted(n for n, by in all_k.items() if by and all(v["verdict"] == "better" for v in by.values()))
    return {
        "ties": {"dropped_minus_kept": ties, "verdict": verdict(ties),
                 "default": "drop" if verdict(ties) == "better" else "keep"},
        "reference": {"previous_minus_initial": reference, "verdict": verdict(reference),
                      "default": "previous" if verdict(reference) == "better" else "initial"},
        "all_k_vs_best_vs_worst": all_k,
        "all_k_arms_that_beat_every_dpo_baseline": beats,
        "dpo_matched_steps_minus_dpo": {**steps, "verdict": verdict(steps)},
    }
