"""`nca-trl generate`: K sampled completions per prompt (the first step of the rated-data loop).

- `arguments`: `GenerateArguments`, parsed with `trl.TrlParser` (command line and `--config X.yaml`);
- `sampling`: prefill once + expanded KV cache, per-completion seeded sampling;
- `rows`: prompts tokenized as `train` tokenizes them, sampled token ids (from any engine) to output rows;
- `output`: resumable chunk files, the merged output and its sidecar;
- `run`: the command (data loading, work split across processes, progress bar);
- `benchmark`: prefill-once against `num_return_sequences`, in generated tokens per second.
"""

from .arguments import GenerateArguments, parse_generate_args
from .rows import completion_rows, decode_completion, tokenize_prompt
from .run import generate, load_prompts
from .sampling import SeededSampler, completion_seed, sample_completions

__all__ = [
    "GenerateArguments",
    "SeededSampler",
    "completion_rows",
    "completion_seed",
    "decode_completion",
    "generate",
    "load_prompts",
    "parse_generate_args",
    "sample_completions",
    "tokenize_prompt",
]
