"""`nca-trl iterate`: rounds of generate -> score -> train from your own prompts (the rated-data loop).

- `arguments`: `IterateArguments`, parsed with `trl.TrlParser` (a recipe `--config X.yaml` and overrides);
- `layout`: the run's files and the per-round stage status that makes a killed run resumable;
- `stages`: each stage as the command a user would run (`generate`, `score`, `train`), and `loss: dpo`;
- `evaluate`: held-out reward, best-of-K reward, KL proxy to the initial model, completion length;
- `report`: the table and the plot;
- `loop`: the command.
"""

from ..runtime.lazy import lazy_exports

# public name -> the module that defines it, imported on first use (`--help` stays light)
_EXPORTS = {
    "IterateArguments": "arguments",
    "parse_iterate_args": "arguments",
    "iterate": "loop",
    "plan_rounds": "loop",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
