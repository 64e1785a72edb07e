"""Experiment 4, `iterative`: iterative (online) training on the ground-truth sorting task, through `nca-trl iterate`.

From the same SFT checkpoint per seed (the `reward` experiment's model, SFT and prompts), each method runs `rounds`
rounds of `nca-trl iterate` with the task's exact reward as the scorer (`nca_trl.scoring.functions:sorted_digits`):
round r samples K completions for its own slice of the training prompts from round r-1's policy, scores them, trains.
Methods: iterative NCA and InfoNCA (all K rated completions), iterative DPO (`trl.DPOTrainer` on best vs worst, the
RLHFlow recipe), and `NCA offline`: one round of NCA on all the rounds' prompts at once, sampled from the SFT policy
(the same prompts, the same number of training steps). Reported per round: the true reward of the policy's samples on
held-out prompts (mean, and best of K), KL proxy to the SFT model; mean and std over seeds.
"""

from __future__ import annotations

import json
import random
import time

from .common import mean_std, seed_everything, sft
from .ground_truth import build_char_model, sort_task

REWARD = "nca_trl.scoring.functions:sorted_digits"
# name -> (loss, offline)
METHODS = {"DPO": ("dpo", False), "InfoNCA": ("infonca", False), "NCA": ("nca", False), "NCA offline": ("nca", True)}
METRICS = ("reward_mean", "reward_best_of_k", "kl_to_initial", "length_mean")


def _prompts(cfg, seed):
    """The seed's demonstrations, training prompts (rounds x prompts_per_round) and held-out prompts, all distinct."""
    n = cfg["num_digits"]
    rng = random.Random(seed)
    seen, tasks = set(), []
    total = cfg["num_demos"] + cfg["rounds"] * cfg["prompts_per_round"] + cfg["num_heldout"]
    while len(tasks) < total:
        task = sort_task(rng, n)
        if task[0] not in seen:
            seen.add(task[0])
            tasks.append(task)
    demos = tasks[:cfg["num_demos"]]
    return demos, [p for p, _ in tasks[cfg["num_demos"]:]]


def sft_start(cfg, seed, work, name):
    """The seed's SFT checkpoint (`work/NAME-sft-SEED`, trained on the seed's demonstrations from a fresh
    character-level model) and its training prompts (`work/NAME-prompts-SEED.jsonl`, one `{"prompt"}` per line)."""
    from transformers import AutoTokenizer

    demos, prompts = _prompts(cfg, seed)
    init = build_char_model(work / f"{name}-init-{seed}", seed, tuple(cfg["model_size"]))
    tok = AutoTokenizer.from_pretrained(init)
    seed_everything(seed)
    sft_path = work / f"{name}-sft-{seed}"
    sft(init, tok, [{"prompt": p, "completion": c} for p, c in demos], seed, work / f"{name}-sft-{seed}-run",
        str(sft_path), cfg["sft_steps"], cfg["sft_batch_size"], cfg["sft_lr"], 32)
    prompts_file = work / f"{name}-prompts-{seed}.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return sft_path, prompts_file


def _recipe(cfg, seed, model, prompts_file, out, loss, rounds, per_round):
    return {
        "model_name_or_path": str(model), "dataset_name": str(prompts_file), "output_dir": str(out),
        "rounds": rounds, "prompts_per_round": per_round, "heldout_prompts": cfg["num_heldout"], "loss": loss,
        "reference": cfg["reference"], "num_completions": cfg["k"], "max_new_tokens": cfg["num_digits"] + 2,
        "temperature": 1.0, "generation_batch_size": 64, "seed": seed, "reward_funcs": [REWARD],
        "scoring_batch_size": 64, "eval_batch_size": 64,
        "training": {
            "dtype": "float32", "max_length": 32, "beta": cfg["beta"], "learning_rate": cfg["lr"],
            "lr_scheduler_type": "constant", "warmup_steps": 0, "num_train_epochs": cfg["epochs"],
            "per_device_train_batch_size": cfg["batch_size"], "bf16": False, "activation_checkpointing": False,
            "use_cpu": True, "save_strategy": "no", "report_to": "none", "logging_steps": 5, "disable_tqdm": True,
            "seed": seed, **({"alpha": cfg["alpha"]} if loss != "dpo" else {}),
        },
    }


def run_iterative(cfg, seeds, work):
    """The `iterative` experiment for every seed and method; its part of results.json."""
    import yaml

    from nca_trl.iterate import iterate

    result = {"task": f"sort {cfg['num_digits']} digits; reward = fraction of output positions right (exact scorer)",
              "methods": list(METHODS), "per_seed": {}}
    for seed in seeds:
        t0 = time.time()
        sft_path, prompts_file = sft_start(cfg, seed, work, "iter")

        per_method = {}
        for name, (loss, offline) in METHODS.items():
            rounds, per_round = (1, cfg["rounds"] * cfg["prompts_per_round"]) if offline else \
                (cfg["rounds"], cfg["prompts_per_round"])
            recipe = work / f"iter-{seed}-{name.replace(' ', '_')}.yaml"
            out = work / f"iter-{seed}-{name.replace(' ', '_')}"
            recipe.write_text(yaml.safe_dump(_recipe(cfg, seed, sft_path, prompts_file, out, loss, rounds, per_round)))
            summary = iterate(["--config", str(recipe)])
            per_method[name] = [{k: row[k] for k in ("round", "train_prompts", *METRICS)} for row in summary["rounds"]]
        result["per_seed"][str(seed)] = {"rounds": per_method, "seconds": time.time() - t0}
        final = ", ".join(f"{m} {rows[-1]['reward_mean']:.3f}" for m, rows in per_method.items())
        print(f"[iterative] seed {seed}: held-out true reward after the last round: {final} "
              f"(SFT {per_method['NCA'][0]['reward_mean']:.3f}; {time.time() - t0:.0f}s)", flush=True)

    # Per method and round: mean and std over seeds (offline: round 0 and its one round, aligned with the last round)
    result["summary"] = {}
    for name in METHODS:
        runs = [result["per_seed"][str(s)]["rounds"][name] for s in seeds]
        result["summary"][name] = [
            {"round": runs[0][i]["round"], **{k: mean_std([run[i][k] for run in runs]) for k in METRICS}}
            for i in range(len(runs[0]))
        ]
    final = {name: [result["per_seed"][str(s)]["rounds"][name][-1]["reward_mean"] for s in seeds] for name in METHODS}
    result["paired_final_vs_DPO"] = {
        name: mean_std([a - b for a, b in zip(final[name], final["DPO"])]) for name in METHODS if name != "DPO"
    }
    return result
