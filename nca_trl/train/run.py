"""`nca-trl train` as a function: parse, load the data, build the trainer, train, save, report.

It has the shape of TRL's `scripts/dpo.py`: parse (`nca_trl.train.arguments`), load the data
(`nca_trl.data.loading`), check it (`nca_trl.train.preflight`), build the trainer, train, save; then it writes
`run_info.json`, the training curves PNG and prints what changed (`nca_trl.train.report`). `nca_trl.cli` runs it as
`nca-trl train`; `nca_trl.iterate` runs it once per round.
"""

from __future__ import annotations

import os
import sys
import time

from ..runtime.errors import SettingsError
from .arguments import TrainArgs, check_paths, parse_train_args, print_dry_run, run_settings

__all__ = ["check_finished_run", "continued_adapter", "start_line", "train"]


def train(argv: "list[str] | TrainArgs | None" = None, callbacks: list | None = None,
          keep_process_group: bool = False) -> dict | None:
    """`nca-trl train`: parse, load and convert the data, train, save, report. Extra `callbacks` go to the trainer.

    `argv` is the command line (`--config RECIPE.yaml`, overrides), or arguments already built (`TrainArgs`, e.g. by
    `train_args_from_recipe`). Returns the run info (on every process), or None for `--dry_run`. The distributed
    process group is destroyed at the end unless `keep_process_group` (a caller with more collective work, like
    `nca-trl iterate`, keeps it).
    """
    if not isinstance(argv, TrainArgs):  # bundled recipes and data by name, as `nca-trl train` finds them
        from ..runtime.bundled import resolve_argv

        argv = resolve_argv(list(sys.argv[1:] if argv is None else argv))
    args = argv if isinstance(argv, TrainArgs) else parse_train_args(argv)
    if args.script.dry_run:
        print_dry_run(args)
        return None

    from ..runtime.launch import check_launch_environment, check_world_size
    from ..runtime.output_dir import claim_output_dir

    from ..config import check_trains_a_step, command_line_spelling

    with command_line_spelling():
        check_trains_a_step(args.training)
    check_paths(args)  # every path setting (a Hub id offline too), before the output_dir is created
    check_launch_environment(args.training)
    check_world_size(args.training.distributed_state)
    # output_dir checked writable and locked for the whole run, before anything is loaded (`nca_trl.runtime.output_dir`)
    # What the user asked for, before the run derives settings of its own (`report_train_prompts` turns on
    # `eval_on_start`): compared with a finished run's, and recorded in `run_info.json`
    settings = run_settings(args)

    # The run's errors name settings as recipe keys and flags (`dataset_format: auto`), as the parser's do
    with claim_output_dir(args.training), command_line_spelling():
        replace = check_finished_run(args, settings)
        resumed_changes = _check_resume(args, settings)
        return _train(args, settings, callbacks, keep_process_group, replace, resumed_changes)


def _check_resume(args: TrainArgs, settings: dict) -> list[str] | None:
    """`--resume_from_checkpoint` resolved before anything loads (`SettingsError`: one line, exit 2): no complete
    checkpoint in `output_dir`, or an incomplete one named, failed after the model and the data had loaded, as a
    traceback. Returns how this run's settings differ from those the checkpoint's run recorded (`key: before ->
    now`; None when not resuming or none were recorded), which is printed: the checkpoint's steps were trained with
    its settings, the steps from it on with these (a changed loss, data or beta was taken up without a word)."""
    from ..runtime.checkpoints import recorded_settings, resolve_resume
    from ..runtime.output_dir import changed_settings

    value = args.training.resume_from_checkpoint
    if value is None:
        return None
    try:  # every process reads the same folder (a launch's processes refuse together); the trainer warns later
        folder = resolve_resume(args.training, _resume_value(value), warn=False)
    except ValueError as error:
        raise SettingsError(f"{error} (`--resume_from_checkpoint {value}`)") from None
    recorded = recorded_settings(folder)
    if recorded is None:
        return None
    changes = changed_settings(recorded, settings)
    if changes and args.training.distributed_state.is_main_process:
        print(f"[nca-trl] resuming {folder}, whose run had other settings ({'; '.join(changes)}): its steps were "
              "trained with those, the steps from it on train with these (recorded in run_info.json as "
              "`resumed_with_changes`)")
    return changes


def check_finished_run(args: TrainArgs, settings: dict | None = None):
    """An earlier run in `output_dir` of other settings is refused, before anything loads, unless
    `overwrite_output_dir` (then its checkpoints and `run_info.json` are removed, so that nothing resumes from them) or
    `resume_from_checkpoint` of one of its checkpoints (continuing it on purpose): a finished run (its
    `run_info.json`), or the complete checkpoints of an unfinished one (the settings their markers record), which a
    later resume would take up instead of this run's. A finished run of the same settings is trained again; an
    unfinished one (its complete checkpoints) is refused too, naming the resume; a resume from a checkpoint of another
    folder into an `output_dir` holding a run is refused unless `overwrite_output_dir`. `settings`:
    `run_settings(args)` taken before the run changed any of them (computed here if not given).

    Returns None, or with `overwrite_output_dir` the removal of the earlier run, for the caller to run once the new run
    has loaded (its data checked, its model built): a start that fails (a bad row) leaves the earlier run as it was."""
    from pathlib import Path

    from ..runtime.output_dir import FinishedRunError, finished_run_message

    output_dir = Path(args.training.output_dir)
    resume = args.training.resume_from_checkpoint
    if resume is not None and _resumes_in_place(resume, output_dir):
        return None
    earlier = _earlier_run(output_dir, settings or run_settings(args))
    if earlier is None:
        return None
    what, changes, finished = earlier
    if resume is not None and not args.script.overwrite_output_dir:
        raise FinishedRunError(
            f"{output_dir} holds {what}: resuming {resume} into it would replace it. Nothing was loaded or written. "
            "Resume into another `output_dir` (`--output_dir PATH`), or replace that run on purpose with "
            "`--overwrite_output_dir true`.")
    if not changes and finished and resume is None:
        print(f"[nca-trl] {output_dir} holds a finished run of these settings: training it again over it")
        return None
    if not changes and not args.script.overwrite_output_dir:
        # The same command again after a Ctrl-C or a kill: it trained from step 0 and removed those checkpoints one by
        # one as it wrote its own, without a word about the resume it could have made
        raise FinishedRunError(
            f"{output_dir} holds {what} of these settings. Continue it with `--resume_from_checkpoint true` (from its "
            "last complete checkpoint), or start it again with `--overwrite_output_dir true` (its checkpoints are "
            "removed). Nothing was loaded or written.")
    if not args.script.overwrite_output_dir:
        message = finished_run_message(str(output_dir), what, changes, "--overwrite_output_dir",
                                       "`output_dir` (`--output_dir PATH`)")
        raise FinishedRunError(message + ("" if finished else " Or continue it with `--resume_from_checkpoint true`."))
    changed = "; ".join(changes[:3]) + ("; ..." if len(changes) > 3 else "") if changes else "the same settings"

    def replace() -> None:
        import shutil

        state = args.training.distributed_state
        if state.is_main_process:
            for checkpoint in output_dir.glob("checkpoint-*"):
                shutil.rmtree(checkpoint)
            (output_dir / "run_info.json").unlink(missing_ok=True)
            print(f"[nca-trl] --overwrite_output_dir: replacing {what} in {output_dir} ({changed})")
        state.wait_for_everyone()

    return replace


def _resumes_in_place(resume: str, output_dir) -> bool:
    """Whether `resume_from_checkpoint` continues a run of `output_dir` (`true`, or one of its checkpoints)."""
    if resume == "true":
        return True
    return os.path.realpath(os.path.dirname(os.path.normpath(resume))) == os.path.realpath(output_dir)


def _earlier_run(output_dir, settings: dict) -> tuple[str, list[str], bool] | None:
    """What run `output_dir` holds (words), how its settings differ from `settings` (`key: before -> now`), whether
    it finished; None if it holds none (no `run_info.json`, no complete checkpoint)."""
    import json

    from ..runtime.checkpoints import checkpoint_settings
    from ..runtime.output_dir import changed_settings

    unrecorded = ["the run's settings were not recorded (written by an older nca-trl or another program)"]
    record = output_dir / "run_info.json"
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())
        except ValueError:
            recorded = {}
        recorded = recorded if isinstance(recorded, dict) else {}
        previous = recorded.get("settings")
        changes = changed_settings(previous, settings) if isinstance(previous, dict) else unrecorded
        return f"a finished {recorded.get('loss', 'training')} run (run_info.json)", changes, True
    checkpoints = checkpoint_settings(str(output_dir))
    if not checkpoints:
        return None
    differing = (changed_settings(recorded, settings) if recorded is not None else unrecorded
                 for recorded in checkpoints.values())
    names = ", ".join(os.path.basename(folder) for folder in checkpoints)
    return f"the checkpoints of an unfinished run ({names})", next((c for c in differing if c), []), False


def _train(args, settings: dict, callbacks: list | None, keep_process_group: bool = False, replace=None,
           resumed_changes: list[str] | None = None) -> dict:
    script_args, training_args, model_args = args.script, args.training, args.model
    from trl import get_peft_config, get_quantization_config

    from ..data.loading import load_datasets
    from ..ref_cache import BASE_REFERENCE
    from ..runtime.checkpoints import RUN_SETTINGS, push_model
    from ..runtime.launch import distributed_summary
    from ..trainer import trainer_for_loss
    from .preflight import check_before_training
    from .report import run_info

    with training_args.main_process_first(desc="loading and converting the data"):
        train_dataset, eval_dataset = load_datasets(script_args, args.mixture, training_args)
    # Before any model: loads the tokenizer only, validates every row once and tokenizes, as the trainer would
    dropped: dict = {}  # per dataset: prompts left out (tied rewards with `ties: drop`, prompts filling max_length)
    train_dataset, eval_dataset = check_before_training(args, train_dataset, eval_dataset, dropped)
    eval_sets = _evaluation_sets(train_dataset, eval_dataset, script_args.report_train_prompts, training_args)

    started = time.time()
    adapter = continued_adapter(model_args, training_args)
    base_reference = adapter is not None and _same_path(script_args.ref_model_name_or_path, _adapter_base(adapter))
    if base_reference:  # the reference is the adapter's base: the adapter disabled, no second model
        setattr(adapter, BASE_REFERENCE, True)  # before the trainer is built: its precompute runs in the constructor
    trainer = trainer_for_loss(script_args.loss)(
        model=model_args.model_name_or_path if adapter is None else adapter,
        ref_model=None if base_reference else _reference_model(script_args.ref_model_name_or_path, training_args),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_sets,
        peft_config=get_peft_config(model_args) if adapter is None else None,
        quantization_config=get_quantization_config(model_args) if adapter is None else None,
        callbacks=callbacks,
    )
    setattr(trainer, RUN_SETTINGS, settings)  # recorded in each checkpoint: a later fresh run compares them
    if base_reference:  # TRL's frozen copy of the adapter, which is not the reference, takes no memory
        trainer.accelerator.unwrap_model(trainer.model).delete_adapter("ref")
    distributed = distributed_summary(trainer)
    _print_start(trainer, script_args.loss, train_dataset, eval_sets, distributed)
    if replace is not None:  # `--overwrite_output_dir`: now that the data and the model loaded
        replace()
    result = trainer.train(resume_from_checkpoint=_resume_value(training_args.resume_from_checkpoint))

    # The model first: a final evaluation that fails (out of memory) or a full disk does not lose the trained steps,
    # nor leave this run's metrics and trainer_state.json beside the earlier model a failed save kept. With
    # `push_to_hub`, the push waits for the results files (below), as when the model was saved last
    push, training_args.push_to_hub = training_args.push_to_hub, False
    try:
        trainer.save_model(training_args.output_dir)
    finally:
        training_args.push_to_hub = push
    metrics = {**result.metrics, "train_samples": len(train_dataset)}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    eval_metrics = None
    if eval_sets is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)

    if push:
        push_model(trainer)

    info = run_info(trainer, model_args, metrics, eval_metrics, started, distributed, settings)
    info["dropped"] = dropped
    if resumed_changes is not None:
        info["resumed_with_changes"] = resumed_changes
    if trainer.accelerator.is_main_process:
        _report(info, training_args.output_dir)
    trainer.accelerator.wait_for_everyone()
    for tracker in trainer.accelerator.trackers:
        tracker.finish()
    if not keep_process_group:  # what `trainer.end()` does, with the trainer's collectives freed first
        from ..runtime.environment import end_process_group

        state = trainer.accelerator.state
        del trainer
        end_process_group(state)
    return info


def continued_adapter(model_args, training_args):
    """With `use_peft`, a `model_name_or_path` that is a PEFT adapter folder (a LoRA run's output, e.g. the previous
    round of `nca-trl iterate`) is trained further: its base loaded as the policy is (`model_init_kwargs`, the QLoRA
    quantization), the adapter on it, trainable. The reference is then the adapter as it was loaded (TRL's frozen
    copy, "ref"), or, when `ref_model_name_or_path` names the adapter's base, the base itself (the adapter disabled).
    None for any other model."""
    import os

    path = model_args.model_name_or_path
    if not model_args.use_peft or not os.path.isfile(os.path.join(str(path), "adapter_config.json")):
        return None
    from peft import PeftConfig, PeftModel
    from trl import get_quantization_config
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(training_args.model_init_kwargs or {})
    quantization = get_quantization_config(model_args)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    base = create_model_from_path(PeftConfig.from_pretrained(path).base_model_name_or_path, **kwargs)
    training_args.model_init_kwargs = None  # used above; TRL warns when given with a model object
    return PeftModel.from_pretrained(base, path, is_trainable=True)


def _adapter_base(adapter) -> str:
    return adapter.peft_config["default"].base_model_name_or_path


def _same_path(a: str | None, b: str | None) -> bool:
    import os

    return a is not None and b is not None and (a == b or os.path.realpath(a) == os.path.realpath(b))


def _reference_model(path: str | None, training_args):
    """`ref_model_name_or_path` loaded the way `trl.DPOTrainer` loads the implicit reference (the policy's
    `model_init_kwargs`, whole model per process under DDP / DeepSpeed); None leaves the reference to the trainer."""
    if path is None:
        return None
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(training_args.model_init_kwargs or {})
    if training_args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", training_args.trust_remote_code)
    return create_model_from_path(path, **kwargs)


def _evaluation_sets(train_dataset, eval_dataset, report_train_prompts: int, training_args):
    """What the trainer evaluates: the held-out set, and with `report_train_prompts` > 0 also that many training
    prompts, evaluated at the start (`eval_on_start`) and the end so the report can show what changed."""
    if eval_dataset is not None and training_args.eval_strategy == "no" and not report_train_prompts:
        return None
    if not report_train_prompts:
        return eval_dataset
    training_args.eval_on_start = True
    sets = {"train_prompts": train_dataset.select(range(min(report_train_prompts, len(train_dataset))))}
    if eval_dataset is not None:
        sets["heldout"] = eval_dataset
    return sets


def _learning_table(log_history: list[dict], final: dict | None) -> str | None:
    """Start (the step-0 evaluation, `eval_on_start`) against end (the final evaluation) for each evaluation set."""
    from .report import eval_set_prefixes, learning_table

    # Each evaluation set logs its own entry: merge the step-0 ones
    start = {k: v for e in log_history if e.get("step") == 0 for k, v in e.items() if k.startswith("eval_")}
    if not start or not final:
        return None
    prefixes = eval_set_prefixes(final)

    def strip(metrics, prefix):
        return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}

    return learning_table({n: strip(start, p) for n, p in prefixes.items()}, {n: strip(final, p) for n, p in prefixes.items()})


def _report(info: dict, output_dir: str) -> None:
    from .report import plot_training_curves, print_summary, write_run_info

    write_run_info(info, output_dir)
    curves = plot_training_curves(info["log_history"], os.path.join(output_dir, "training_curves.png"))
    print_summary(info, _learning_table(info["log_history"], info["eval_metrics"]), curves)


def start_line(loss: str, train_size: int, eval_sets, distributed: dict) -> str:
    """The run's first line: what it trains on, what it evaluates, and where. E.g. `[nca-trl] nca: training on 72
    prompts; evaluating 72 training prompts and 8 held-out prompts; world size 1 (NO, backend None, device cpu)`."""
    names = {"train_prompts": "training prompts", "heldout": "held-out prompts"}
    if eval_sets is None:
        evaluated = ""
    elif isinstance(eval_sets, dict):
        evaluated = " and ".join(f"{len(v)} {names.get(k, k + ' prompts')}" for k, v in eval_sets.items())
    else:
        evaluated = f"{len(eval_sets)} held-out prompts"
    return (
        f"[nca-trl] {loss}: training on {train_size} prompts" + (f"; evaluating {evaluated}" if evaluated else "")
        + f"; world size {distributed['world_size']} ({distributed['distributed_type']}"
        + (f", ZeRO-{distributed['zero_stage']}" if distributed["zero_stage"] is not None else "")
        + f", backend {distributed['backend']}, device {distributed['device']})"
    )


def _print_start(trainer, loss, train_dataset, eval_sets, distributed) -> None:
    trainer.accelerator.print(start_line(loss, len(train_dataset), eval_sets, distributed))


def _resume_value(value):
    """`resume_from_checkpoint` (as `resume_setting` spells it) for `Trainer.train`."""
    return True if value == "true" else value
