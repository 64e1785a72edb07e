"""An example rule-based check for `nca-trl score` (docs/generate-score-iterate.md), named by its file:
`--reward_funcs examples/checks.py:format_ok`. TRL's GRPO convention: `f(prompts, completions, **columns) ->
list[float | None]`, one value per completion; other columns of the row (none here) come as keyword arguments, with
`log_metric(name, value)` for a metric of your own in the scoring sidecar.
"""


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def format_ok(prompts, completions, log_metric=None, **kwargs):
    """1.0 when the completion is plain prose (printable characters, no run of 3 or more blank lines) that ends a
    sentence (`.`, `!` or `?`), else 0.0."""
    rewards = []
    for completion in completions:
        text = _text(completion).strip()
        printable = all(c.isprintable() or c in "\n\t" for c in text)
        rewards.append(float(printable and "\n\n\n" not in text and text.endswith((".", "!", "?"))))
    if log_metric is not None and rewards:
        log_metric("format_ok_rate", sum(rewards) / len(rewards))
    return rewards
