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

from .arguments import ScoreArguments, make_score_parser, parse_score_args
from .combine import is_empty_completion, score_rows
from .functions import ascii_letters, sorted_digits
from .run import load_rows, score, score_file, scoring_sidecar_path, write_rows
from .sources import RewardModelScorer, load_reward_function, load_sources

__all__ = [
    "RewardModelScorer",
    "ScoreArguments",
    "ascii_letters",
    "is_empty_completion",
    "load_reward_function",
    "load_rows",
    "load_sources",
    "make_score_parser",
    "parse_score_args",
    "score",
    "score_file",
    "score_rows",
    "scoring_sidecar_path",
    "sorted_digits",
    "write_rows",
]
