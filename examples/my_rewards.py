"""An example reward function for `nca-trl score` (docs/generate-score-iterate.md), in TRL's GRPO convention:
`f(prompts, completions, **columns) -> list[float | None]`, one reward per completion.

    PYTHONPATH=examples nca-trl score --dataset_name outputs/samples.jsonl --reward_funcs my_rewards:brevity \
        --output outputs/rated.jsonl

(`my_rewards:brevity` is found on PYTHONPATH or in the current folder; `examples/my_rewards.py:brevity` names the file.)
"""


def _text(completion) -> str:
    """A completion's text: the string, or the content of the last message of a conversational completion."""
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"] if completion else ""


def brevity(prompts, completions, **kwargs):
    """Shorter is better: 1 / (1 + number of words), 0.5 for one word, tending to 0 for long answers. None (not
    scored: `nca-trl score` drops the completion) for an empty completion."""
    rewards = []
    for completion in completions:
        text = _text(completion).strip()
        rewards.append(1.0 / (1.0 + len(text.split())) if text else None)
    return rewards
