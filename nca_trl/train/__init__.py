"""`nca-trl train`: a recipe (or command-line fields) to a trained, saved and reported model.

- `arguments`: `ScriptArguments` (data, loss, evaluation) beside `NCAConfig`/`InfoNCAConfig`, `trl.ModelConfig` and
  `trl.DatasetMixtureConfig`, parsed by `trl.TrlParser` (`parse_train_args`, `--dry_run`);
- `run`: the command (`train`): parse, load the data, check it, build the trainer, train, save, report;
- `preflight`: checks between loading the data and loading any model (every row dropped by `max_length`, empty sets);
- `report`: what the run tells at the end (`run_info.json`, the before/after learning table, the training curves).
"""

from ..runtime.lazy import lazy_exports

# public name -> the module that defines it, imported on first use (`--help` stays light)
_EXPORTS = {
    "ScriptArguments": "arguments",
    "parse_train_args": "arguments",
    "train": "run",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
