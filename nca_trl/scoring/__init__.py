"""`nca-trl score`: add `rewards` to {prompt, completions} rows (the second step of the rated-data loop).

```bash
nca-trl score --dataset_name samples.jsonl --reward_model path/to/rm --output rated.jsonl
nca-trl score --dataset_name samples.jsonl --reward_funcs my_rewards:brevity sorted_digits \\
    --reward_weights 0.5 1.0 --output rated.parquet
nca-trl train --config recipe.yaml --dataset_name rated.jsonl
```

- `arguments`: `ScoreArguments`, parsed with `trl.TrlParser` (command line and/or `--config X.yaml`);
- `sources`: reward functions from `module:function` / `file.py:function` specs, and `RewardModelScorer` (an
  `AutoModelForSequenceClassification` with num_labels=1, its own tokenizer and chat template);
- `combine`: `score_rows`, the library entry point (`nca-trl iterate` calls it in process);
- `functions`: bundled reward functions, `sorted_digits` and `ascii_letters`;
- `run`: the command, `score(argv) -> sidecar dict` (raises on errors, never exits).

Library use:

```python
from nca_trl.scoring import load_sources, score_rows

sources = load_sources(reward_model=None, reward_funcs=["nca_trl.scoring.functions:ascii_letters"])
scored_rows, stats = score_rows(rows, sources, weights=None)   # rows: [{"prompt", "completions", ...}]
```

`score_rows(rows, sources, weights=None, *, chunk_size=64, row_ids=None, log=..., progress=True)` returns the rated
rows and the statistics (`rows_in`, `rows_out`, `completions_in`, `completions_out`, `dropped`, `none_by_source`,
`sources`, `rewards`, `replaced_rewards`, `metrics`); `sources` is `{name: callable}` or a list of callables.
"""

from ..runtime.lazy import lazy_exports

# public name -> the module that defines it, imported on first use (`--help` stays light)
_EXPORTS = {
    "ScoreArguments": "arguments",
    "make_score_parser": "arguments",
    "parse_score_args": "arguments",
    "is_empty_completion": "combine",
    "score_rows": "combine",
    "ascii_letters": "functions",
    "sorted_digits": "functions",
    "load_rows": "run",
    "score": "run",
    "score_file": "run",
    "scoring_sidecar_path": "run",
    "write_rows": "run",
    "RewardModelScorer": "sources",
    "load_reward_function": "sources",
    "load_sources": "sources",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
