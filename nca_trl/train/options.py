"""What `nca-trl train`'s quick check (`help.check_argv`, before anything heavy is imported) and its parser
(`arguments`) share: the losses and the path settings. Imports nothing, so that both can import it (and `help`
renders from `arguments` without an import circle)."""

__all__ = ["LOSSES", "PATH_SETTINGS", "truthy"]

#: The losses of `nca-trl train --loss` (tests/test_cli.py checks them against `nca_trl.config.RATED_CONFIGS`)
LOSSES = ("nca", "infonca")
#: The settings of `nca-trl train` that name a path, and what each names (`nca_trl.runtime.paths.KINDS`): each is
#: checked before anything is imported, written or loaded. `accelerate_config` and `model_config_file` are left out:
#: training ignores them (they are read by humans and scripts/plan_memory.py, which checks them itself).
PATH_SETTINGS = {
    "model_name_or_path": "model",
    "ref_model_name_or_path": "model",
    "dataset_name": "dataset",
    "datasets": "dataset",
    "resume_from_checkpoint": "folder",
    "deepspeed": "file",
    "fsdp_config": "file",
    "accelerator_config": "file",
}


def truthy(value) -> bool:
    """A boolean setting as a recipe or the command line spells it (`true`, `1`, `yes`, `on`; any case)."""
    return str(value).strip().lower() in ("1", "true", "yes", "y", "on")
