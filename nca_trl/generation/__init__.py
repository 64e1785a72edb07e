"""`nca-trl generate`: K sampled completions per prompt (the first step of the rated-data loop).

- `arguments`: `GenerateArguments`, parsed with `trl.TrlParser` (command line and `--config X.yaml`);
- `sampling`: prefill once + expanded KV cache, per-completion seeded sampling;
- `rows`: prompts tokenized as `train` tokenizes them, sampled token ids (from any engine) to output rows;
- `output`: resumable chunk files, the merged output and its sidecar;
- `run`: the command (data loading, work split across processes, progress bar);
- `benchmark`: prefill-once against `num_return_sequences`, in generated tokens per second.
"""

from ..runtime.lazy import lazy_exports

# public name -> the module that defines it, imported on first use (`--help` stays light)
_EXPORTS = {
    "GenerateArguments": "arguments",
    "parse_generate_args": "arguments",
    "completion_rows": "rows",
    "decode_completion": "rows",
    "tokenize_prompt": "rows",
    "generate": "run",
    "load_prompts": "run",
    "SeededSampler": "sampling",
    "completion_seed": "sampling",
    "sample_completions": "sampling",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
