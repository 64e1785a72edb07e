"""The stages of one `nca-trl iterate` round, each the command a user would run by hand (`nca-trl generate`,
`nca-trl score`, `nca-trl train`), called in-process with the argument list printed in the log; and `loss: dpo`,
which trains `trl.DPOTrainer` on the best-vs-worst pair of each prompt."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import yaml

from .layout import read_jsonl

__all__ = ["best_worst_pairs", "run_generate", "run_score", "run_train"]


def _log(message: str) -> None:
    """Print on the main process of a launch (`RANK` 0) only."""
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"[nca-trl iterate] {message}", flush=True)


def _show(command: str, argv: list[str]) -> None:
    _log(f"nca-trl {command} " + " ".join(shlex.quote(a) for a in argv))


def run_generate(args, model: str, prompts: Path, output: Path, seed: int) -> dict | None:
    """`nca-trl generate` of K completions per prompt of `prompts` from `model` (resumes its own chunks)."""
    from ..generation import generate

    argv = ["--model_name_or_path", model, "--dataset_name", str(prompts), "--output", str(output),
            "--num_completions", str(args.num_completions), "--max_new_tokens", str(args.max_new_tokens),
            "--temperature", str(args.temperature), "--top_p", str(args.top_p), "--top_k", str(args.top_k),
            "--seed", str(seed), "--batch_size", str(args.generation_batch_size), "--dtype", args.generation_dtype]
    _show("generate", argv)
    return generate(argv)


def run_score(args, samples: Path, output: Path) -> dict:
    """`nca-trl score` of `samples` with the run's reward model and/or reward functions, in this process (the main
    one of a launch)."""
    from ..scoring import score_file
    from ..scoring.arguments import parse_score_args

    argv = ["--dataset_name", str(samples), "--output", str(output), "--batch_size", str(args.scoring_batch_size)]
    if args.reward_model:
        argv += ["--reward_model", args.reward_model]
    if args.reward_funcs:
        argv += ["--reward_funcs", *args.reward_funcs]
    if args.reward_weights:
        argv += ["--reward_weights", *map(str, args.reward_weights)]
    _show("score", argv)
    return score_file(parse_score_args(argv))


def best_worst_pairs(rows: list[dict]) -> tuple[list[dict], int]:
    """`{"prompt", "chosen", "rejected"}` from each rated row's best and worst completion (the first of ties); rows
    whose rewards are all equal have no preference and are left out. Returns (pairs, number left out)."""
    pairs, ties = [], 0
    for row in rows:
        rewards = row["rewards"]
        best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
        worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
        if rewards[best] == rewards[worst]:
            ties += 1
            continue
        extra = {k: v for k, v in row.items() if k in ("tools", "chat_template_kwargs")}
        pairs.append({"prompt": row["prompt"], "chosen": row["completions"][best],
                      "rejected": row["completions"][worst], **extra})
    return pairs, ties


def run_train(args, r: int, policy: str, reference: str | None, rated: Path, output_dir: Path) -> dict:
    """Train round r's policy from `policy` on `rated` into `output_dir`; `reference` None = the starting policy.
    Continues from the last complete checkpoint of `output_dir` if a killed run left one."""
    training = {"seed": args.seed, **args.training}
    if args.loss == "dpo":
        return _train_dpo(policy, reference, rated, output_dir, training)
    from ..runtime.checkpoints import last_complete_checkpoint
    from ..train import train

    recipe = {"loss": args.loss, "model_name_or_path": policy, "dataset_name": str(rated), "dataset_format": "rated",
              "output_dir": str(output_dir), **training}
    if reference is not None:
        recipe["ref_model_name_or_path"] = reference
    config = output_dir.parent / "train.yaml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    argv = ["--config", str(config)]
    if last_complete_checkpoint(str(output_dir), warn=False) is not None:
        argv += ["--resume_from_checkpoint", "true"]
    _show("train", argv)
    info = train(argv, keep_process_group=True)
    return {"loss": args.loss, "train_prompts": len(read_jsonl(rated)), "config": str(config),
            "train_loss": (info or {}).get("train_metrics", {}).get("train_loss")}


def _dpo_fields(training: dict) -> dict:
    """The `training:` mapping of an NCA recipe as `trl.DPOConfig` fields, so that `--loss dpo` runs the same recipe:
    model loading fields (dtype, attention, revision) go to `model_init_kwargs`; the NCA-only fields (alpha, ...) and
    the launch metadata of `nca-trl train` are left out, and said so."""
    from dataclasses import fields

    from trl import DPOConfig

    from ..config import NCAConfig

    dpo = {f.name for f in fields(DPOConfig)}
    model_keys = {"dtype": "dtype", "attn_implementation": "attn_implementation", "model_revision": "revision"}
    out, init, ignored = {}, {}, []
    for key, value in training.items():
        if key in dpo:
            out[key] = value
        elif key in model_keys:
            init[model_keys[key]] = value
        else:
            ignored.append(key)
    if init:
        out["model_init_kwargs"] = {**init, **(out.get("model_init_kwargs") or {})}
    unknown = [k for k in ignored if k not in {f.name for f in fields(NCAConfig)} and k not in _TRAIN_SCRIPT_KEYS]
    if unknown:
        raise ValueError(f"`training` has {unknown}: not fields of trl.DPOConfig nor of `nca-trl train`.")
    if ignored:
        _log(f"dpo: ignoring the training field(s) {ignored} (NCA / nca-trl train only)")
    return out


_TRAIN_SCRIPT_KEYS = ("accelerate_config", "hardware", "model_config_file", "report_train_prompts", "eval_fraction",
                      "max_train_samples", "max_eval_samples", "dataset_test_split", "dataset_format_kwargs")


def _train_dpo(policy: str, reference: str | None, rated: Path, output_dir: Path, training: dict) -> dict:
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint
    from trl import DPOConfig, DPOTrainer

    pairs, ties = best_worst_pairs(read_jsonl(rated))
    if ties:
        _log(f"dpo: {ties} of {ties + len(pairs)} prompts have completions that all got the same reward: no pair, "
             "left out")
    if not pairs:
        raise ValueError(f"dpo: no prompt of {rated} has two completions with different rewards: nothing to train on.")
    config = DPOConfig(output_dir=str(output_dir), **_dpo_fields(training))
    ref_model = None
    if reference is not None:
        from trl.trainer.utils import create_model_from_path

        kwargs = dict(config.model_init_kwargs or {})
        kwargs.setdefault("trust_remote_code", config.trust_remote_code)
        ref_model = create_model_from_path(reference, **kwargs)
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=config, train_dataset=Dataset.from_list(pairs))
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    _log(f"dpo: trl.DPOTrainer on {len(pairs)} best-vs-worst pairs" + (f", resuming from {last}" if last else ""))
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(output_dir))
    trainer.accelerator.wait_for_everyone()
    return {"loss": "dpo", "train_prompts": len(pairs), "ties_left_out": ties,
            "train_loss": result.metrics.get("train_loss")}
