"""The held-out evaluation of `nca-trl iterate`: what the policy's samples earn, and how far the policy moved.

For each held-out prompt the policy samples K completions (`nca-trl generate`, always with the same seed) and the
scorer rates them (`nca-trl score`). Per round:

- `reward_mean`: mean reward of the scored completions, empty ones included (`nca-trl score --evaluation`: an empty
  answer is the policy's too; a completion that the reward functions score None is left out, counted in
  `completions_scored`); `reward_best_of_k`: mean over the scored prompts of their best reward; `empty_completions`:
  how many of the samples are empty;
- `kl_to_initial`: the KL proxy, mean over the sampled completions y of log pi(y|x) - log pi_0(y|x) (summed over the
  completion's tokens, as `nca-trl train` tokenizes them: EOS appended), pi_0 the initial model. A Monte-Carlo
  estimate of KL(pi || pi_0) from the policy's own samples: 0 for the initial model;
- `length_mean`: mean completion length in tokens (all sampled completions, before scoring drops any).
"""

from __future__ import annotations

import math

__all__ = ["completion_logps", "round_metrics"]


def completion_logps(model, items: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 8) -> list[float]:
    """Summed log-probabilities of each completion given its prompt.

    Args:
        model: a causal LM (eval mode is set for the call and restored).
        items: `(prompt_ids, completion_ids)` pairs.
        pad_id: the token that pads a batch (masked out).

    Returns:
        One float per item: sum over t of log p(completion_ids[t] | prompt_ids, completion_ids[:t]).
    """
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]) - len(items[i][1]))
    values: dict[int, float] = {}
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            seqs = [list(items[i][0]) + list(items[i][1]) for i in batch]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, (i, seq) in enumerate(zip(batch, seqs)):
                ids[row, :len(seq)] = torch.tensor(seq)
                attention[row, :len(seq)] = 1
                mask[row, len(items[i][0]):len(seq)] = True
            ids, attention, mask = ids.to(device), attention.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
            logps = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
            sums = (logps * mask[:, 1:]).sum(1).tolist()
            values.update(zip(batch, sums))
    out = [values[i] for i in range(len(items))]
    if was_training:
        model.train()
    return out


def _tokenized(rows: list[dict], tokenizer) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, completion_ids) of every completion, as `nca-trl train` tokenizes it."""
    from ..data.tokenize import tokenize_rated_example

    items = []
    for row in rows:
        example = {**row, "rewards": [0.0] * len(row["completions"])}
        tokens = tokenize_rated_example(example, tokenizer, tokenizer.eos_token)
        items += [(tokens["prompt_ids"], ids) for ids in tokens["completion_ids"]]
    return items


def _load(path: str, dtype: str, device, trust_remote_code: bool):
    import torch

    from ..runtime.models import load_text_model

    dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    return load_text_model(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device)


def kl_to_initial(samples: list[dict], policy_path: str, initial_path: str, dtype: str, batch_size: int,
                  trust_remote_code: bool = False) -> float:
    """Mean of log pi(y|x) - log pi_0(y|x) over the sampled completions of `samples` (rows {prompt, completions});
    the models' own code runs with `trust_remote_code`."""
    import gc

    import torch
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=trust_remote_code)
    items = [(p, c) for p, c in _tokenized(samples, tokenizer) if c]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums = []
    for path in (policy_path, initial_path):
        model = _load(path, dtype, device, trust_remote_code)
        sums.append(completion_logps(model, items, pad_id, batch_size))
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return sum(a - b for a, b in zip(*sums)) / max(len(items), 1)


def round_metrics(samples: list[dict], rated: list[dict], tokenizer, kl: float | None) -> dict:
    """The evaluation numbers of one round from its held-out samples and their scored rows."""
    from ..scoring.combine import is_empty_completion

    lengths = [len(ids) for _, ids in _tokenized(samples, tokenizer)]
    rated = [row for row in rated if row["rewards"]]
    rewards = [r for row in rated for r in row["rewards"]]
    if not rewards:
        raise ValueError(f"No held-out completion was scored (of {len(samples)} prompts): the reward sources scored "
                         "every one None.")
    metrics = {
        "reward_mean": sum(rewards) / len(rewards),
        "reward_best_of_k": sum(max(row["rewards"]) for row in rated) / len(rated),
        "kl_to_initial": kl,
        "length_mean": sum(lengths) / max(len(lengths), 1),
        "prompts": len(samples),
        "prompts_scored": len(rated),
        "completions_scored": len(rewards),
        "empty_completions": sum(is_empty_completion(c) for row in samples for c in row["completions"]),
    }
    if not all(math.isfinite(v) for v in (metrics["reward_mean"], metrics["reward_best_of_k"])):
        raise ValueError(f"Non-finite evaluation reward: {metrics}")
    return metrics
