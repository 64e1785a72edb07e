"""Prompts to token ids and sampled token ids to output rows, the way `nca-trl train` will tokenize them back.

Engine-independent: `nca-trl generate` uses these with its own sampler, and completions sampled elsewhere (vLLM,
`trl vllm-serve`, any server that returns token ids) become the same rows with [`completion_rows`].
"""

from __future__ import annotations

import json

from trl.data_utils import _tokenize, is_conversational

from ..data.formats import FINISHED_COLUMN, text_problem
from ..runtime.errors import DataError

__all__ = ["check_prompts", "completion_rows", "decode_completion", "tokenize_prompt"]


def tokenize_prompt(example: dict, tokenizer) -> list[int]:
    """The prompt's token ids exactly as `nca_trl.data.tokenize` (and `trl.DPOTrainer`) tokenize it for training:
    the chat template with `add_generation_prompt=True` (and the row's `tools` / `chat_template_kwargs`) for a list of
    messages, the plain string (with the tokenizer's special tokens, e.g. BOS) otherwise."""
    prompt = example["prompt"]
    if is_conversational({"prompt": prompt}):
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        template_kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
        return list(_tokenize(tokenizer, prompt, add_generation_prompt=True, **template_kwargs)["input_ids"])
    if not isinstance(prompt, str):
        raise TypeError(f"A prompt must be a string or a list of chat messages, got {type(prompt).__name__}.")
    return list(_tokenize(tokenizer, prompt)["input_ids"])


def check_prompts(rows, tokenizer, source: str, model: str, context: int | None = None,
                  max_new_tokens: int = 0) -> dict:
    """Refuse what `nca-trl score` / `train` would refuse later, before anything is sampled: a `null` or empty
    prompt, and chat prompts for a tokenizer without a chat template (a `DataError` naming `source`, the row and the
    field).
    Returns the prompts that with `max_new_tokens` overrun the model's `context` (`{"context", "count", "rows"}`,
    the first 20 rows), for the log and the sidecar."""
    long_rows, count = [], 0
    for i, row in enumerate(rows):
        prompt = row["prompt"]
        if prompt is None or (isinstance(prompt, (str, list)) and not (prompt.strip() if isinstance(prompt, str)
                                                                       else prompt)):
            what = "null" if prompt is None else "empty"
            raise DataError(f"{source}, row {i}, field 'prompt': the prompt is {what}. Give the row a prompt or "
                            "remove it.")
        if not isinstance(prompt, str) and not is_conversational({"prompt": prompt}):
            got = (f"a list of {type(prompt[0]).__name__}" if isinstance(prompt, list) and prompt
                   else type(prompt).__name__)
            raise DataError(f"{source}, row {i}, field 'prompt': a prompt is a string or a list of chat messages "
                            f"({{\"role\": ..., \"content\": ...}}), not {got}. Fix the row or remove it.")
        # The rule `nca-trl score` / `train` apply to chat prompts (every message's content empty): one of them let
        # through here failed `nca-trl iterate` at a round's scoring, after its sampling
        problem = text_problem(prompt, "the prompt", needs_assistant=False) if isinstance(prompt, list) else None
        if problem:
            raise DataError(f"{source}, row {i}, field 'prompt': {problem}. Give the row a prompt or remove it.")
        if is_conversational({"prompt": prompt}) and getattr(tokenizer, "chat_template", None) is None:
            raise DataError(
                f"{source}, row {i}, field 'prompt': a list of chat messages, but the tokenizer of {model} has no chat "
                "template to render it. Use a chat (instruct) model, set `tokenizer.chat_template` in the model "
                "folder's tokenizer_config.json, or give plain-text prompts."
            )
        if context is not None and len(tokenize_prompt(row, tokenizer)) + max_new_tokens > context:
            count += 1
            if len(long_rows) < 20:
                long_rows.append(i)
    return {"context": context, "count": count, "rows": long_rows}


def decode_completion(tokenizer, prompt_ids: list[int], completion_ids: list[int]) -> str:
    """The completion's text: decode(prompt + completion) minus decode(prompt), so that a leading space the
    tokenizer attaches to the first completion token (SentencePiece "▁") is kept and `prompt + completion` mostly
    re-tokenizes to the sampled tokens (not a sequence the tokenizer would not produce itself, nor tokens merging with
    the prompt's end); decode(completion) alone when the prompt's text is not a prefix."""
    head = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(list(prompt_ids) + list(completion_ids))
    if full.startswith(head):
        return full[len(head):]
    return tokenizer.decode(completion_ids)


def _cut(ids: list[int], stop_ids) -> list[int]:
    end = next((j for j, token in enumerate(ids) if token in stop_ids), None)
    return list(ids) if end is None else list(ids[:end])


def completion_rows(examples: list[dict], prompt_ids: list[list[int]], completion_ids: list[list[list[int]]],
                    tokenizer, stop_ids=None, finished: list[list[bool]] | None = None) -> list[dict]:
    """Output rows `{"prompt", "completions", "finished", ...carried columns}` of `nca-trl generate`.

    Args:
        examples: the prompt rows (their `prompt` and carried columns; `completions`, `rewards`, `chosen` and
            `rejected` of earlier completions are left out).
        prompt_ids: each prompt tokenized with `tokenize_prompt` (what the completions were sampled after).
        completion_ids: per prompt, its K completions as token ids; each is cut before its first stop token.
        stop_ids: the tokens that end a completion (default: the tokenizer's EOS). `train` appends EOS to standard
            completions and the chat template's end of turn to conversational ones, if they finished.
        finished: per prompt, whether each completion ended by itself (default: it holds a stop token; an engine
            that stops on strings says it, e.g. vLLM's `finish_reason == "stop"`). Written as the `finished` column:
            `train` gives a completion cut at `max_new_tokens` no EOS or end of turn, as it was sampled.

    Standard prompts get string completions; conversational prompts get `[{"role": "assistant", "content": text}]`.
    """
    stops = {tokenizer.eos_token_id} if stop_ids is None else set(stop_ids)
    rows = []
    if finished is None:
        finished = [[any(token in stops for token in c) for c in completions] for completions in completion_ids]
    for example, ids, completions, done in zip(examples, prompt_ids, completion_ids, finished, strict=True):
        texts = [decode_completion(tokenizer, ids, _cut(c, stops)) for c in completions]
        if is_conversational({"prompt": example["prompt"]}):
            texts = [[{"role": "assistant", "content": text}] for text in texts]
        carried = {k: v for k, v in example.items() if k not in ("prompt", "completions", "rewards", "chosen",
                                                                   "rejected", FINISHED_COLUMN)}
        rows.append({"prompt": example["prompt"], "completions": texts, FINISHED_COLUMN: [bool(d) for d in done],
                     **carried})
    return rows
