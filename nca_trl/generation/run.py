"""`nca-trl generate`: K sampled completions per prompt, written resumably, split across processes.

```bash
nca-trl generate --model_name_or_path outputs/tiny-mistral --dataset_name prompts.jsonl \
    --num_completions 4 --max_new_tokens 128 --output samples.jsonl
accelerate launch --num_processes 8 -m nca_trl.cli generate --config gen.yaml      # one shard per process
```

The prompts are cut into chunks of `chunk_size` prompts (chunk c = prompts [c * chunk_size, (c + 1) * chunk_size) of
the split, in order). The main process lists the chunks still missing from `<output>.parts/` and every process takes
every N-th of them; each chunk is generated in batches of `batch_size` prompts (sorted by length inside the chunk to
pad less) and committed as one file. When all chunks exist the main process merges them in prompt order.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from ..runtime.environment import broadcast, distributed_state, main_process_first, versions
from ..runtime.errors import DataError
from ..runtime.files import json_digest, parquet_table
from ..runtime.paths import check_data_folder, check_output_file, check_path_settings
from .arguments import PATH_SETTINGS, GenerateArguments, parse_generate_args
from .output import ChunkStore, parts_path, sidecar_path

__all__ = ["SAMPLER", "generate", "generation_settings", "load_prompts"]

SAMPLER = "nca-trl seeded inverse-CDF v1"  # recorded in the settings: another sampler makes other samples
_DROPPED = ("completions", "rewards", "chosen", "rejected")  # belong to earlier completions, not to the new ones


def _log(message: str) -> None:
    print(f"[nca-trl generate] {message}", flush=True)


def load_prompts(args: GenerateArguments):
    """The prompt rows: the split `dataset_split` of `dataset_name`, its first `max_prompts` rows, without the columns
    of earlier completions (`completions`, `rewards`, `chosen`, `rejected`)."""
    from ..data.loading import load_split
    from ..runtime.paths import check_path

    check_path(args.dataset_name, "dataset_name", "dataset")  # not the Hub's error for a missing file
    dataset = load_split(args, limit=args.max_prompts)
    if "prompt" not in dataset.column_names:
        raise DataError(
            f"The prompts need a `prompt` column (a string, or a list of chat messages); {args.dataset_name} has the "
            f"columns {dataset.column_names}."
        )
    if len(dataset) == 0:
        raise DataError(f"{args.dataset_name} (split {args.dataset_split}) has no prompt: nothing to sample.")
    dropped = [c for c in _DROPPED if c in dataset.column_names]
    if dropped:
        _log(f"dropping the column(s) {dropped}: they describe earlier completions, not the ones sampled now")
        dataset = dataset.remove_columns(dropped)
    return dataset


def generation_settings(args: GenerateArguments, dataset) -> dict:
    """What determines the samples: a restart must have the same (`batch_size` may change: it changes no seed)."""
    keys = ("model_name_or_path", "model_revision", "dataset_name", "dataset_config", "dataset_split", "max_prompts",
            "num_completions", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "dtype", "chunk_size")
    settings = {key: getattr(args, key) for key in keys}
    carried = [name for name in dataset.column_names if name != "prompt"]  # `tools` too: it changes the prompt's ids
    settings.update(num_prompts=len(dataset), prompts_sha256=json_digest(dataset["prompt"]),
                    carried_sha256=json_digest(dataset.select_columns(carried).to_list() if carried else []),
                    sampler=SAMPLER)
    return settings


def _check_prompts(args: GenerateArguments, dataset, main: bool) -> tuple[dict, object]:
    """`rows.check_prompts` with the model's tokenizer and context length (config `max_position_embeddings`), before
    any output or part file exists; the prompts that overrun the context are said once, by the main process.
    Returns what it found and the tokenizer (sampling uses it)."""
    from transformers import AutoTokenizer

    from ..runtime.models import text_model_config
    from .rows import check_prompts

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, revision=args.model_revision,
                                              trust_remote_code=args.trust_remote_code)
    # The model's config (a LoRA adapter's: its base's)
    config = text_model_config(args.model_name_or_path, args.model_revision, args.trust_remote_code)
    context = getattr(config.get_text_config(), "max_position_embeddings", None)  # a multimodal model's: its text's
    found = check_prompts(dataset, tokenizer, args.dataset_name, args.model_name_or_path, context,
                          args.max_new_tokens)
    if found["count"] and getattr(config.get_text_config(), "rope_parameters", None) is None:
        # Rotary positions run past the context (the samples degrade); learned position embeddings (GPT-2, OPT) end
        # there: an index error inside torch mid-run. Only rotary models are known to run on
        from ..runtime.errors import DataError

        raise DataError(
            f"{args.dataset_name}: {found['count']} prompt(s) and their {args.max_new_tokens} new tokens overrun the "
            f"context of {args.model_name_or_path} ({context} positions, which it cannot go past; rows "
            f"{found['rows']}{', ...' if found['count'] > 20 else ''}). Lower `max_new_tokens`, or shorten or remove "
            "those prompts."
        )
    if found["count"] and main:
        _log(f"{found['count']} prompt(s) of {args.dataset_name} and their {args.max_new_tokens} new tokens overrun "
             f"the model's context of {context} tokens (rows {found['rows']}{', ...' if found['count'] > 20 else ''}): "
             "they are sampled as the model can; shorten them or lower `max_new_tokens`")
    return found, tokenizer


def _load_model(args: GenerateArguments, device):
    import torch

    from ..runtime.models import load_text_model

    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    kwargs = {"dtype": dtype, "trust_remote_code": args.trust_remote_code}
    if args.attn_implementation is not None:
        kwargs["attn_implementation"] = args.attn_implementation
    return load_text_model(args.model_name_or_path, args.model_revision, **kwargs).to(device).eval()


def _generate_chunk(rows: list[dict], indices: list[int], model, tokenizer, args, stop_ids, pad_id, progress):
    """Output rows of one chunk (in prompt order) and its statistics."""
    from .rows import completion_rows, tokenize_prompt
    from .sampling import sample_completions

    started = time.time()
    prompt_ids = [tokenize_prompt(row, tokenizer) for row in rows]
    order = sorted(range(len(rows)), key=lambda j: -len(prompt_ids[j]))  # batches of similar lengths pad less
    completion_ids: list = [None] * len(rows)
    finished: list = [None] * len(rows)
    stats = {"prompts": len(rows), "completions": 0, "generated_tokens": 0, "truncated_completions": 0,
             "empty_completions": 0, "seconds": 0.0}
    for start in range(0, len(order), args.batch_size):
        batch = order[start:start + args.batch_size]
        sampled = sample_completions(
            model, [prompt_ids[j] for j in batch], [indices[j] for j in batch],
            num_completions=args.num_completions, max_new_tokens=args.max_new_tokens, seed=args.seed,
            stop_ids=stop_ids, pad_token_id=pad_id, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        )
        for j, ids_k, finished_k in zip(batch, sampled.completions, sampled.finished):
            completion_ids[j], finished[j] = ids_k, finished_k
            stats["truncated_completions"] += sum(not f for f in finished_k)
            stats["empty_completions"] += sum(not ids for ids in ids_k)
        stats["completions"] += len(batch) * args.num_completions
        stats["generated_tokens"] += sampled.generated_tokens
        progress(len(batch), sampled.generated_tokens)
    out = completion_rows(rows, prompt_ids, completion_ids, tokenizer, stop_ids, finished)
    stats["seconds"] = round(time.time() - started, 3)
    return out, stats


class _Progress:
    """A tqdm bar of the prompts this process samples, with the generated tokens per second."""

    def __init__(self, total: int, enabled: bool, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="prompt", desc=desc, disable=not enabled, dynamic_ncols=True)
        self.tokens = 0
        self.started = time.time()

    def __call__(self, prompts: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.time() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
        self.bar.update(prompts)

    def close(self) -> None:
        self.bar.close()


def generate(argv: "list[str] | GenerateArguments | None" = None) -> dict | None:
    """`nca-trl generate` on a command line, or on arguments already built (`GenerateArguments`): returns the
    sidecar (main process) or None (other processes)."""
    args = argv if isinstance(argv, GenerateArguments) else parse_generate_args(argv)
    check_path_settings([], PATH_SETTINGS, vars(args))  # before the output's `.parts/` or any model load
    output = Path(args.output)
    check_output_file(output, "output", sidecar_path(output), parts_path(output))
    check_data_folder(args.dataset_name, "dataset_name", output)  # its output and chunks would be read as prompts
    from ..runtime.output_dir import claim_output_file

    state = distributed_state()
    with claim_output_file(output, state):  # a second run of the same output is refused
        return _generate(args, state)


def _generate(args: GenerateArguments, state) -> dict | None:
    with main_process_first(state):  # a bad file on the main process is the others' error too, not their hang
        dataset = load_prompts(args)
    long_prompts, tokenizer = _check_prompts(args, dataset, state.is_main_process)
    if str(args.output).lower().endswith(".parquet"):  # the carried columns fit one Parquet file, before sampling
        parquet_table(dataset.to_list(), f"{args.dataset_name} (for the Parquet output {args.output})")
    settings = generation_settings(args, dataset)
    store = ChunkStore(args.output, settings, len(dataset), args.chunk_size)

    status = store.open(args.overwrite_output) if state.is_main_process else None
    status = broadcast(state, status)
    todo = broadcast(state, [] if status in ("done", "merge") else store.missing_chunks())
    if status == "done":
        if state.is_main_process:
            _log(f"{args.output} already holds these {len(dataset)} prompts (settings match): nothing to do")
            return json.loads(sidecar_path(args.output).read_text())
        return None
    if state.is_main_process and status == "resume":
        _log(f"resuming: {store.num_chunks - len(todo)} of {store.num_chunks} chunks already written")
    mine = todo[state.process_index::state.num_processes]

    if mine:
        model = _load_model(args, state.device)
        from .sampling import stop_token_ids

        stop_ids = stop_token_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        total = sum(len(store.chunk_range(c)) for c in mine)
        desc = "prompts" if state.num_processes == 1 else f"prompts (process 0 of {state.num_processes})"  # main's bar
        progress = _Progress(total, state.is_main_process, desc)
        try:
            for chunk in mine:
                indices = list(store.chunk_range(chunk))
                rows = [dataset[i] for i in indices]
                out, stats = _generate_chunk(rows, indices, model, tokenizer, args, stop_ids, pad_id, progress)
                stats["process_index"] = state.process_index
                store.write_chunk(chunk, out, stats)
        finally:
            progress.close()

    if not state.is_main_process:
        return None
    store.wait_for_chunks(log=_log)
    stats = store.stats()
    sidecar = {
        "output": str(args.output),
        "model_name_or_path": args.model_name_or_path,
        "num_prompts": len(dataset),
        "num_completions": args.num_completions,
        "settings": settings,
        "long_prompts": long_prompts,
        "arguments": asdict(args),
        "stats": stats,
        "num_processes": state.num_processes,
        "versions": versions(),
    }
    store.merge(sidecar)
    seconds = stats.get("seconds", 0.0)
    rate = f", {stats.get('generated_tokens', 0) / seconds:,.0f} tok/s per process" if seconds else ""
    _log(
        f"{len(dataset)} prompts x {args.num_completions} completions -> {args.output} "
        f"({stats.get('generated_tokens', 0)} tokens{rate}; {stats.get('truncated_completions', 0)} completions hit "
        f"max_new_tokens); settings in {sidecar_path(args.output)}"
    )
    if stats.get("empty_completions"):
        _log(f"{stats['empty_completions']} completion(s) are empty (the model stopped at once): kept here; "
             "`nca-trl score` drops them, as `nca-trl train` refuses them (`--evaluation` scores them)")
    return sidecar
