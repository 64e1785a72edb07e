"""K sampled completions per prompt: one prefill per prompt, a KV cache expanded to K rows, seeded per completion.

Prefill once: the left-padded prompts minus their last token run through the model once into a
`DynamicCache`, `cache.batch_repeat_interleave(K)` copies each prompt's keys and values to its K rows, and
`model.generate` continues from the last prompt token (`num_return_sequences=K` would prefill every prompt K times).

Seeded per completion: HF sampling draws every row of a batch from one global generator, so a prompt's samples
would depend on which prompts share its batch. Here completion k of the prompt at row number i draws its uniforms
from its own `torch.Generator`, seeded by (seed, i, k) (`completion_seed`); [`SeededSampler`] turns the processed
logits into a token by inverse-CDF sampling with that completion's uniform for the current step, and hands `generate`
a one-hot score so that its greedy step picks that token. The distribution is the one HF's `do_sample=True` draws
from (same processors, then temperature, top-k, top-p, the order of `GenerationMixin._get_logits_processor`), and the
samples depend only on (seed, i, k): not on the batch size, the chunk size, the number of processes or a restart.
What can still differ between two batchings is the floating-point rounding of the logits (another padding length,
another matrix shape), which moves a sampled token only when a uniform falls within that rounding of a CDF boundary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

__all__ = [
    "NonFiniteSamplingError",
    "SampledBatch",
    "SeededSampler",
    "completion_seed",
    "completion_uniforms",
    "sample_completions",
    "stop_token_ids",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def completion_seed(seed: int, prompt_index: int, completion_index: int) -> int:
    """The seed of completion `completion_index` of the prompt at row `prompt_index` (a 63-bit integer)."""
    x = 0
    for value in (seed, prompt_index, completion_index):
        x = _splitmix64(x ^ (value & _MASK64))
    return x >> 1


def completion_uniforms(seed: int, prompt_indices: list[int], num_completions: int, steps: int) -> torch.Tensor:
    """(len(prompt_indices) * K, steps) float64 uniforms in [0, 1), rows in `repeat_interleave` order (prompt-major).

    A completion's first t uniforms do not depend on `steps` (a prefix of its stream), nor on K (its own stream).
    """
    rows = []
    for i in prompt_indices:
        for k in range(num_completions):
            generator = torch.Generator().manual_seed(completion_seed(seed, i, k))
            rows.append(torch.rand(steps, generator=generator, dtype=torch.float64))
    return torch.stack(rows)


class NonFiniteSamplingError(RuntimeError):
    """The model's next-token distribution is NaN: nothing sensible can be sampled from it."""


class SeededSampler(LogitsProcessor):
    """Sample each row's next token with that row's own uniform; return a score that is 0 at it and -inf elsewhere.

    Give it to `generate(..., do_sample=False, logits_processor=[sampler])`: HF's processors run before it, it
    applies temperature / top-k / top-p itself (HF adds its warpers only when `do_sample=True`), and the greedy step
    picks the sampled token.

    Args:
        uniforms: (rows, max_new_tokens) in [0, 1), from `completion_uniforms`.
        prompt_length: the (padded) prompt length of `input_ids`: step t is `input_ids.shape[1] - prompt_length`.
    """

    def __init__(self, uniforms: torch.Tensor, prompt_length: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0):
        self.uniforms = uniforms
        self.prompt_length = prompt_length
        self.warpers = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))

    def probabilities(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        """The sampling distribution (float32), as HF's `_sample` computes it after its warpers."""
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        return torch.softmax(scores.float(), dim=-1)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        probs = self.probabilities(input_ids, scores)
        bad = ~torch.isfinite(probs).all(dim=-1)
        if bad.any():  # a NaN drew token 0 (`<unk>`) for every token: completions of garbage, exit 0
            raise NonFiniteSamplingError(
                f"the next-token distribution is not finite (NaN) at new token {step} of batch row(s) "
                f"{bad.nonzero().squeeze(1).tolist()[:8]}: the model's logits are NaN or infinite (weights that are not "
                f"finite, e.g. a diverged training run), or `temperature` is so small that logits / temperature "
                f"overflow. This batch was not written; chunks written before it are kept.")
        u = self.uniforms[:, step].to(probs.device)
        tokens = inverse_cdf(probs, u)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens[:, None], 0.0)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token j of each row such that cdf[j-1] <= u * total < cdf[j] (float64 cumulative sum): a token of probability
    0 is never drawn; P(j) = probs[j] / total."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u.double() * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return torch.where(tokens >= probs.shape[-1], probs.argmax(dim=-1), tokens)  # u * total rounded up to total


@dataclass
class SampledBatch:
    """Per prompt, K completions as token ids cut before the first stop token, and whether each one stopped."""

    completions: list[list[list[int]]]
    finished: list[list[bool]]
    generated_tokens: int  # tokens the model produced, stop tokens included


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a completion: the model's generation-config EOS token(s) and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _cache_kwarg(model) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values`, whichever the model's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _left_pad(prompt_ids: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids in prompt_ids)
    input_ids = torch.tensor([[pad_token_id] * (length - len(ids)) + ids for ids in prompt_ids], device=device)
    mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    return input_ids, mask


def _generation_config(model, max_new_tokens, stop_ids, pad_token_id, do_sample: bool, temperature, top_p, top_k):
    import copy

    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.eos_token_id = list(stop_ids) or None  # none: every sequence runs max_new_tokens (benchmarks)
    config.pad_token_id = pad_token_id
    config.num_beams = 1
    config.num_return_sequences = 1
    config.do_sample = do_sample
    # The model's sampling defaults (e.g. temperature 0.6) are replaced by the arguments; with do_sample=False
    # (seeded or greedy) HF applies no warper at all
    config.temperature, config.top_p, config.top_k = (temperature, top_p, top_k) if do_sample else (None, None, None)
    config.min_p = None
    return config


@torch.no_grad()
def sample_completions(
    model,
    prompt_ids: list[list[int]],
    prompt_indices: list[int],
    *,
    num_completions: int,
    max_new_tokens: int,
    seed: int,
    stop_ids: list[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    sampling: str = "seeded",
    prefill_once: bool = True,
) -> SampledBatch:
    """Sample `num_completions` completions for each prompt of a batch (token ids, no padding).

    Args:
        prompt_ids: the tokenized prompts (`tokenize_prompt`), any lengths: they are left-padded here.
        prompt_indices: each prompt's row number in the data, which seeds its completions.
        sampling: `"seeded"` (per-completion generators, `SeededSampler`), `"hf"` (`do_sample=True`, HF's global
            generator: seed it yourself with `torch.manual_seed`) or `"greedy"` (`do_sample=False`).
        prefill_once: prefill each prompt once and expand the cache to K rows; False expands the prompt before
            `generate` (K prefills per prompt, what `num_return_sequences=K` does).
    """
    device = model.device
    k = num_completions
    input_ids, mask = _left_pad(prompt_ids, pad_token_id, device)
    length = input_ids.shape[1]
    processors = LogitsProcessorList()
    if sampling == "seeded":
        uniforms = completion_uniforms(seed, prompt_indices, k, max_new_tokens).to(device)
        processors.append(SeededSampler(uniforms, length, temperature, top_p, top_k))
    elif sampling not in ("hf", "greedy"):
        raise ValueError(f"sampling must be 'seeded', 'hf' or 'greedy', got {sampling!r}")
    config = _generation_config(
        model, max_new_tokens, stop_ids, pad_token_id, sampling == "hf", temperature, top_p, top_k
    )
    extra = {}

    expanded_ids, expanded_mask = input_ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    if prefill_once and length > 1:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        prefix_mask = mask[:, :-1]
        position_ids = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
        name = _cache_kwarg(model)
        model(input_ids=input_ids[:, :-1], attention_mask=prefix_mask, position_ids=position_ids, use_cache=True,
              logits_to_keep=1, **{name: cache})
        cache.batch_repeat_interleave(k)
        extra[name] = cache
    out = model.generate(
        expanded_ids, attention_mask=expanded_mask, generation_config=config, logits_processor=processors, **extra
    )
    generated = out[:, length:].tolist()
    stops = set(stop_ids)
    completions, finished, total = [], [], 0
    for row in generated:
        end = next((j for j, token in enumerate(row) if token in stops), None)
        total += len(row) if end is None else end + 1
        completions.append(row if end is None else row[:end])
        finished.append(end is not None)
    return SampledBatch(
        completions=[completions[b * k:(b + 1) * k] for b in range(len(prompt_ids))],
        finished=[finished[b * k:(b + 1) * k] for b in range(len(prompt_ids))],
        generated_tokens=total,
    )
