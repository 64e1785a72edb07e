"""Every knob of every experiment (`FULL`), the `--quick` smoke sizes (`QUICK`), and `--set EXP.KEY=VALUE` parsing.

Both tables are written to results.json (the part for the experiments that ran)."""

from __future__ import annotations

import json

FULL = {
    "seeds": [0, 1, 2],
    "identity": {
        "num_pairs": 16,
        "betas": [0.01, 0.1, 1.0],
        "model_size": [64, 128, 2, 4, 2],
        "max_length": 192,
    },
    "trend": {
        "tokenizer": "bpe",  # or "mistral" (real Mistral-7B tokenizer, 32k vocab: ~10x slower on a CPU)
        "bpe_vocab_size": 2048,
        # hidden, intermediate, layers, heads, kv heads
        "model_size": [128, 256, 2, 4, 2],
        "max_length": 128,
        "num_heldout": 16,
        "sft_epochs": 8,
        "sft_batch_size": 16,
        "sft_lr": 3e-3,
        "steps": 60,
        "batch_size": 4,
        "lr": 5e-4,  # the setting of the main figure; every lr of grid_lr is run (same SFT checkpoint)
        "grid_lr": [1e-4, 5e-4],
        "beta": 0.01,
        "alpha": 0.0,
        "eval_every": 5,
    },
    "reward": {
        "num_digits": 5,
        "model_size": [128, 256, 2, 4, 2],
        "num_demos": 128,
        "sft_steps": 100,
        "sft_batch_size": 32,
        "sft_lr": 3e-3,
        "num_train_prompts": 512,
        "k": 4,
        "sample_temperature": 1.0,
        "num_heldout": 500,
        "steps": 100,
        "batch_size": 16,
        "lr": 1e-4,
        "beta": 0.1,
        "alpha": 0.1,
        # sensitivity: every method is also trained at each of these (lr, beta), same SFT model and samples
        "grid": {"lr": [1e-4, 5e-4], "beta": [0.01, 0.1, 1.0]},
    },
    "iterative": {
        "num_digits": 5,
        "model_size": [128, 256, 2, 4, 2],
        "num_demos": 128,
        "sft_steps": 100,
        "sft_batch_size": 32,
        "sft_lr": 3e-3,
        "rounds": 3,
        "prompts_per_round": 160,  # round r trains on its own 160 prompts; `NCA offline` on all 480 at once
        "num_heldout": 200,
        "k": 4,
        "epochs": 3,  # per round: 30 steps of 16 prompts (offline: 90 steps, the same total)
        "batch_size": 16,
        "lr": 1e-4,
        "beta": 0.1,
        "alpha": 0.1,
        "reference": "initial",
    },
}
# The pre-registered ablation (results/ablation/PLAN.md): the `iterative` setting, 5 seeds, two tasks
FULL["ablation"] = {
    **FULL["iterative"],
    "seeds": [0, 1, 2, 3, 4],
    "tasks": {"main": {}, "hard": {"num_digits": 8, "num_demos": 64, "sft_steps": 60}},
}
QUICK = {
    "seeds": [0],
    "identity": {"num_pairs": 4, "betas": [0.1], "model_size": [32, 64, 1, 2, 1], "max_length": 96},
    "trend": {
        **FULL["trend"],
        "model_size": [32, 64, 1, 2, 1],
        "max_length": 48,
        "num_heldout": 4,
        "sft_epochs": 1,
        "steps": 4,
        "batch_size": 2,
        "eval_every": 2,
        "grid_lr": [5e-4],
    },
    "reward": {
        **FULL["reward"],
        "model_size": [32, 64, 1, 2, 1],
        "num_demos": 64,
        "sft_steps": 20,
        "num_train_prompts": 32,
        "num_heldout": 50,
        "steps": 4,
        "batch_size": 8,
        "grid": {"lr": [1e-4], "beta": [0.1]},
    },
    "iterative": {
        **FULL["iterative"],
        "model_size": [32, 64, 1, 2, 1],
        "num_demos": 64,
        "sft_steps": 20,
        "rounds": 2,
        "prompts_per_round": 16,
        "num_heldout": 16,
        "epochs": 1,
        "batch_size": 8,
    },
}
QUICK["ablation"] = {
    **QUICK["iterative"],
    "seeds": [0, 1],
    "prompts_per_round": 8,
    "num_heldout": 8,
    "tasks": {"main": {}, "hard": {"num_digits": 8, "num_demos": 32, "sft_steps": 10}},
}


def load_settings(quick, overrides):
    """A deep copy of QUICK or FULL with each `EXP.KEY=VALUE` of `overrides` applied (VALUE parsed as JSON, else
    kept as a string). Raises KeyError on an unknown setting."""
    settings = json.loads(json.dumps(QUICK if quick else FULL))
    for item in overrides:
        key, _, value = item.partition("=")
        exp, _, field = key.partition(".")
        if exp not in settings or field not in settings[exp]:
            raise KeyError(f"--set {item}: unknown setting {key!r}")
        try:
            settings[exp][field] = json.loads(value)
        except json.JSONDecodeError:
            settings[exp][field] = value
    return settings
