"""The stages of one `nca-trl iterate` round, each the command a user would run by hand (`nca-trl generate`,
`nca-trl score`, `nca-trl train`), called in-process on the arguments `parse_iterate_args` built once for the run
(`IterateArguments.stages`), of which a round replaces only its own fields; the equivalent command is printed in the
log. And `loss: dpo`, which trains `trl.DPOTrainer` on the best-vs-worst pair of each prompt."""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

import yaml

from ..runtime.recipes import as_argv
from .layout import log, read_jsonl

__all__ = ["best_worst_pairs", "marked_dpo_trainer", "run_generate", "run_score", "run_train"]


def _show(command: str, argv: list[str]) -> None:
    log(f"nca-trl {command} " + " ".join(shlex.quote(a) for a in argv))


def run_generate(args, model: str, prompts: Path, output: Path, seed: int) -> dict | None:
    """`nca-trl generate` of K completions per prompt of `prompts` from `model` (resumes its own chunks)."""
    from ..generation import generate

    stage = replace(args.stages.generate, model_name_or_path=model, dataset_name=str(prompts), output=str(output),
                    seed=seed)
    _show("generate", as_argv(stage))
    return generate(stage)


def run_score(args, samples: Path, output: Path, evaluation: bool = False) -> dict:
    """`nca-trl score` of `samples` with the run's reward model and/or reward functions, in this process (the main
    one of a launch); `evaluation`: the held-out samples, empty completions scored too (`ScoreArguments.evaluation`)."""
    from ..scoring import score_file

    stage = replace(args.stages.score, dataset_name=str(samples), output=str(output), evaluation=evaluation)
    _show("score", as_argv(stage))
    return score_file(stage)


def best_worst_pairs(rows: list[dict]) -> tuple[list[dict], int]:
    """`{"prompt", "chosen", "rejected"}` from each rated row's best and worst completion (the first of ties); rows
    whose rewards all tie (`nca_trl.data.rewards.rewards_tie`, the test of `ties: drop`) have no preference and are left
    out. Returns (pairs, number left out)."""
    from ..data.rewards import rewards_tie

    pairs, ties = [], 0
    for row in rows:
        rewards = row["rewards"]
        if rewards_tie(rewards):
            ties += 1
            continue
        best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
        worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
        extra = {k: v for k, v in row.items() if k in ("tools", "chat_template_kwargs")}
        pairs.append({"prompt": row["prompt"], "chosen": row["completions"][best],
                      "rejected": row["completions"][worst], **extra})
    return pairs, ties


def run_train(args, r: int, policy: str, reference: str | None, rated: Path, output_dir: Path) -> dict:
    """Train round r's policy from `policy` on `rated` into `output_dir`; `reference` None = the starting policy.
    Continues from the last complete checkpoint of `output_dir` if a killed run left one."""
    if args.loss == "dpo":
        config = replace(args.stages.train, output_dir=str(output_dir))
        return _train_dpo(policy, reference, rated, output_dir, config)
    from ..runtime.checkpoints import last_complete_checkpoint
    from ..train import train
    from ..train.arguments import TrainArgs

    template = args.stages.train
    own = {"model_name_or_path": policy, "dataset_name": str(rated), "output_dir": str(output_dir)}
    if reference is not None:
        own["ref_model_name_or_path"] = reference
    resume = last_complete_checkpoint(str(output_dir), warn=False) is not None
    stage = TrainArgs(
        script=replace(template.script, dataset_name=own["dataset_name"], ref_model_name_or_path=reference),
        training=replace(template.training, output_dir=own["output_dir"], resume_from_checkpoint="true" if resume
                         else None, model_init_kwargs=dict(template.training.model_init_kwargs or {})),
        model=replace(template.model, model_name_or_path=policy),
        mixture=template.mixture,
        recipe={**template.recipe, **own},
    )
    # The recipe file of the round: the same run by hand is `nca-trl train --config` it
    config = output_dir.parent / "train.yaml"
    config.write_text(yaml.safe_dump(stage.recipe, sort_keys=False))
    _show("train", ["--config", str(config)] + (["--resume_from_checkpoint", "true"] if resume else []))
    info = train(stage, keep_process_group=True) or {}
    dropped = info.get("dropped", {}).get("train", {})  # tied rewards with `ties: drop`, prompts filling max_length
    ties = dropped.get("ties_dropped", 0)
    left_out = sum(n for n in dropped.values() if isinstance(n, int) and not isinstance(n, bool))
    return {"loss": args.loss, "train_prompts": len(read_jsonl(rated)) - left_out, "ties_dropped": ties,
            "ties": getattr(stage.training, "ties", "keep"), "config": str(config),
            "train_loss": info.get("train_metrics", {}).get("train_loss"), "train_steps": info.get("global_step")}


def _train_dpo(policy: str, reference: str | None, rated: Path, output_dir: Path, config) -> dict:
    """`trl.DPOTrainer` with `config` (the run's DPOConfig, this round's output_dir) on best-vs-worst pairs."""
    from datasets import Dataset

    from ..runtime.checkpoints import last_complete_checkpoint

    pairs, ties = best_worst_pairs(read_jsonl(rated))
    if ties:
        log(f"dpo: {ties} of {ties + len(pairs)} prompts have completions that all got the same reward: no pair, "
             "left out")
    if not pairs:
        from ..runtime.errors import DataError

        raise DataError(f"dpo: no prompt of {rated} has two completions with different rewards: nothing to train on. "
                        "Rate the completions apart (another reward), or sample more completions per prompt.")
    ref_model = None
    if reference is not None:
        from trl.trainer.utils import create_model_from_path

        kwargs = dict(config.model_init_kwargs or {})
        kwargs.setdefault("trust_remote_code", config.trust_remote_code)
        ref_model = create_model_from_path(reference, **kwargs)
    trainer = marked_dpo_trainer()(model=policy, ref_model=ref_model, args=config,
                                   train_dataset=Dataset.from_list(pairs))
    last = last_complete_checkpoint(str(output_dir))  # never one killed while it was written
    log(f"dpo: trl.DPOTrainer on {len(pairs)} best-vs-worst pairs" + (f", resuming from {last}" if last else ""))
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(output_dir))
    trainer.accelerator.wait_for_everyone()
    return {"loss": "dpo", "train_prompts": len(pairs), "ties_left_out": ties,
            "train_loss": result.metrics.get("train_loss"), "train_steps": result.global_step}


def marked_dpo_trainer():
    """`trl.DPOTrainer` whose checkpoints get nca-trl's completeness marker once fully written (as `NCATrainer`'s do),
    so that resuming a killed `loss: dpo` round never picks a checkpoint that was being written, and that stops at a
    non-finite loss or gradient norm as ours do."""
    from trl import DPOTrainer

    from ..runtime.checkpoints import ResumeAtTheEndMixin, save_checkpoint
    from ..runtime.safety import NonFiniteStopsMixin

    # Resumed at its last step: no step past it; a NaN loss or gradient norm stops it (it saved a model of NaN weights)
    class MarkedDPOTrainer(NonFiniteStopsMixin, ResumeAtTheEndMixin, DPOTrainer):
        def _save_checkpoint(self, model, trial):
            save_checkpoint(self, super()._save_checkpoint, model, trial)

    return MarkedDPOTrainer

