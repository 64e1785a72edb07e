"""`nca-trl generate`: K sampled completions per prompt (DESIGN §5, the first step of the rated-data loop).

- `arguments`: `GenerateArguments`, parsed with `trl.TrlParser` (command line and `--config X.yaml`);
- `sampling`: prefill once + expanded KV cache, per-completion seeded sampling, prompt tokenization as `train` does it;
- `output`: resumable chunk files, the merged output and its sidecar;
- `run`: the command (data loading, work split across processes, progress bar);
- `benchmark`: prefill-once against `num_return_sequences`, in generated tokens per second.
"""

from .arguments import GenerateArguments, parse_generate_args
from .run import generate, load_prompts
from .sampling import SeededSampler, completion_seed, sample_completions, tokenize_prompt

__all__ = [
    "GenerateArguments",
    "SeededSampler",
    "completion_seed",
    "generate",
    "load_prompts",
    "parse_generate_args",
    "sample_completions",
    "tokenize_prompt",
]
