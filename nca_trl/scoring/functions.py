"""Reward functions bundled with nca-trl, in TRL's `GRPOTrainer` convention: `f(prompts, completions, **kwargs) ->
list[float | None]`, one reward per completion (`None`: not scorable, `nca-trl score` drops that completion).

Both take standard completions (strings) and conversational ones (lists of messages: the last message's content is
scored); prompts are strings or message lists likewise.

```bash
nca-trl score --dataset_name samples.jsonl --reward_funcs sorted_digits --output rated.jsonl
nca-trl score --dataset_name samples.jsonl --reward_funcs nca_trl.scoring.functions:ascii_letters --output rated.jsonl
```
"""

from __future__ import annotations

import string

__all__ = ["ascii_letters", "sorted_digits", "sorting_target"]

_LETTERS_AND_SPACE = frozenset(string.ascii_letters + " ")


def _text(value) -> str:
    """A completion's (or prompt's) text: the string itself, or the content of a message list's last message."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            return ""
        last = value[-1]
        content = last.get("content") if isinstance(last, dict) else last
        return content if isinstance(content, str) else ""
    raise TypeError(f"expected a string or a list of chat messages, got {type(value).__name__}")


def sorting_target(prompt) -> str | None:
    """The sorted digits a sorting prompt asks for: the digits right before the prompt's last `>` (anything before
    them, such as a BOS token or a chat prefix, is ignored), sorted; None when there are no such digits.

    >>> sorting_target("31415>")
    '11345'
    >>> sorting_target("<s>907>") , sorting_target("hello>") , sorting_target("31415")
    ('079', None, None)
    """
    text = _text(prompt).rstrip()
    end = text.rfind(">")
    if end < 0:
        return None
    start = end
    while start > 0 and text[start - 1].isdigit() and text[start - 1].isascii():
        start -= 1
    digits = text[start:end]
    return "".join(sorted(digits)) if digits else None


def sorted_digits(prompts: list, completions: list, **kwargs) -> list[float | None]:
    """Ground-truth reward of the digit-sorting task (`scripts/nca_reproduce/ground_truth.py`): the prompt is digits
    followed by `>`, e.g. `"31415>"`, the right answer is them sorted, `"11345"`. The reward is the fraction of
    positions right, `sum(a == b for a, b in zip(output, target)) / max(len(target), len(output))` (a missing or an
    extra character counts as wrong), where `output` is the completion with surrounding whitespace stripped. None for a
    prompt that is not a sorting prompt.

    >>> sorted_digits(["31415>", "31415>", "31415>", "What is 2+2?"], ["11345", " 11354\\n", "113450", "4"])
    [1.0, 0.6, 0.8333333333333334, None]
    """
    rewards: list[float | None] = []
    for prompt, completion in zip(prompts, completions, strict=True):
        target = sorting_target(prompt)
        if target is None:
            rewards.append(None)
            continue
        output = _text(completion).strip()
        right = sum(a == b for a, b in zip(output, target))
        rewards.append(right / max(len(target), len(output)))
    return rewards


def ascii_letters(prompts: list, completions: list, **kwargs) -> list[float]:
    """The fraction of the completion's characters that are ASCII letters or spaces: a toy reward that a tiny
    random-weight model learns in minutes (the tiny `nca-trl iterate` recipe). 0 for an empty completion (no letters:
    an evaluation that scores empty answers, `nca-trl score --evaluation`, counts them as the worst).

    >>> ascii_letters(["p", "p", "p", "p"], ["Hello world", "Hi 42!", "", [{"role": "assistant", "content": "ok"}]])
    [1.0, 0.5, 0.0, 1.0]
    """
    rewards: list[float] = []
    for completion in completions:
        text = _text(completion)
        rewards.append(sum(c in _LETTERS_AND_SPACE for c in text) / len(text) if text else 0.0)
    return rewards
