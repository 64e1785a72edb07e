"""`nca-trl generate`: prefill-once sampling, per-completion seeds, resumable chunks, the command end to end."""

import json

import pytest
import torch

from nca_trl.generation import sampling
from nca_trl.generation.sampling import (
    completion_uniforms,
    decode_completion,
    inverse_cdf,
    sample_completions,
    stop_token_ids,
    tokenize_prompt,
)

PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and then",
    "Hi",
    "Write one sentence about the sea:",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_mistral):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_mistral)


def _kwargs(model, tokenizer, **overrides):
    kwargs = dict(num_completions=3, max_new_tokens=6, seed=7, stop_ids=stop_token_ids(model, tokenizer),
                  pad_token_id=tokenizer.eos_token_id, temperature=0.8, top_k=50, top_p=0.95)
    return {**kwargs, **overrides}


def _ids(tokenizer, prompts=PROMPTS):
    ids = [tokenize_prompt({"prompt": p}, tokenizer) for p in prompts]
    assert len({len(x) for x in ids}) == len(ids)  # different lengths: the batch is left-padded
    return ids


# ------------------------------------------------------------------------------------------------ (a) and (d): greedy
@pytest.mark.parametrize("prefill_once", [True, False])
def test_batched_left_padded_greedy_equals_plain_generate_one_prompt_at_a_time(model_and_tokenizer, prefill_once):
    """Left padding + attention mask (d), and prefill-once with the expanded cache (a): greedy completions of a batch
    of prompts of different lengths are token-identical to HF `generate` on each prompt alone (no padding, no
    cache trick)."""
    model, tokenizer = model_and_tokenizer
    ids = _ids(tokenizer)
    batch = sample_completions(model, ids, [0, 1, 2], sampling="greedy", prefill_once=prefill_once,
                               **_kwargs(model, tokenizer))
    for prompt_ids, completions in zip(ids, batch.completions):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=6, pad_token_id=tokenizer.eos_token_id)
        expected = ref[0, len(prompt_ids):].tolist()
        assert all(c == expected for c in completions), (completions, expected)


# ------------------------------------------------------------------------------------------------ (a): sampling
def test_seeded_samples_do_not_depend_on_batching_nor_on_prefill_once(model_and_tokenizer):
    """Prefill-once sampling of a batch gives the same completions as sampling each prompt alone with K prefills
    (what `num_return_sequences` does), in any batch order: each completion has its own seeded stream."""
    model, tokenizer = model_and_tokenizer
    ids = _ids(tokenizer)
    kwargs = _kwargs(model, tokenizer)
    batched = sample_completions(model, ids, [10, 11, 12], **kwargs).completions
    alone = [sample_completions(model, [x], [10 + i], prefill_once=False, **kwargs).completions[0]
             for i, x in enumerate(ids)]
    assert batched == alone
    reordered = sample_completions(model, ids[::-1], [12, 11, 10], **kwargs).completions
    assert reordered[::-1] == batched
    # The K samples differ from one another, and a prompt's samples follow its row number and the seed
    assert all(len({tuple(c) for c in completions}) == 3 for completions in batched)
    assert sample_completions(model, ids, [13, 14, 15], **kwargs).completions != batched
    assert sample_completions(model, ids, [10, 11, 12], **{**kwargs, "seed": 8}).completions != batched
    # More completions per prompt keep the first ones; more tokens extend them (each completion's own stream)
    more = sample_completions(model, ids, [10, 11, 12], **{**kwargs, "num_completions": 4}).completions
    assert [m[:3] for m in more] == batched
    no_stop = {**kwargs, "stop_ids": []}
    short = sample_completions(model, ids[:1], [10], **no_stop).completions[0]
    longer = sample_completions(model, ids[:1], [10], **{**no_stop, "max_new_tokens": 9}).completions[0]
    assert [c[:6] for c in longer] == short


def test_step_logits_of_prefill_once_equal_plain_generation(model_and_tokenizer, monkeypatch):
    """At every generated step, the logits prefill-once generation samples from equal those of plain generation of
    each prompt alone (same prefix, since the samples are the same): the same distribution, step by step."""
    model, tokenizer = model_and_tokenizer
    recorded = []

    class Recording(sampling.SeededSampler):
        def __call__(self, input_ids, scores):
            recorded[-1].append(scores.clone())
            return super().__call__(input_ids, scores)

    monkeypatch.setattr(sampling, "SeededSampler", Recording)
    ids = _ids(tokenizer)
    kwargs = _kwargs(model, tokenizer, stop_ids=[], max_new_tokens=5)  # no stop: every row has every step
    recorded.append([])
    sample_completions(model, ids, [0, 1, 2], **kwargs)
    batched = recorded[-1]
    for i, x in enumerate(ids):
        recorded.append([])
        sample_completions(model, [x], [i], prefill_once=False, **kwargs)
        for step, (b, a) in enumerate(zip(batched, recorded[-1])):
            torch.testing.assert_close(b[3 * i:3 * i + 3], a, atol=1e-4, rtol=1e-4, msg=f"prompt {i}, step {step}")
        assert len(recorded[-1]) == len(batched) == 5


def test_inverse_cdf_on_a_fixed_grid_of_uniforms():
    """Deterministic: N evenly spaced uniforms give each token within one count of N * p; a token of probability 0
    is never drawn, not even at u = 0 or u close to 1."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]])
    n = 1000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tokens = inverse_cdf(probs.expand(n, -1), u)
    counts = torch.bincount(tokens, minlength=6)
    assert counts.tolist() == [0, 500, 0, 300, 200, 0]
    edges = inverse_cdf(probs.expand(3, -1), torch.tensor([0.0, 0.5, 1 - 1e-16], dtype=torch.float64))
    assert edges.tolist() == [1, 3, 4]


def _expected_distribution(logits, temperature, top_k, top_p):
    """Written out independently of HF's warpers: softmax(logits / T), restricted to the top_k tokens, then to the
    smallest set of the most likely ones with mass >= top_p, renormalised."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True)
    keep = order[:top_k] if top_k else order
    kept = probs[keep] / probs[keep].sum()
    if top_p < 1:
        n = int((kept.cumsum(0) < top_p).sum()) + 1
        keep, kept = keep[:n], kept[:n] / kept[:n].sum()
    return {int(t): float(p) for t, p in zip(keep, kept)}


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.05, 5, 1.0), (0.05, 0, 0.3)])
def test_first_token_frequencies_follow_the_sampling_distribution(model_and_tokenizer, temperature, top_k, top_p):
    """1000 first tokens sampled prefill-once (5 batches of K = 200): only tokens of the warped distribution, with
    frequencies within a chi-square bound of its probabilities (4 or fewer degrees of freedom; 20 is p < 0.001),
    and far from the distribution without the temperature (the check can fail)."""
    model, tokenizer = model_and_tokenizer
    prompt_ids = tokenize_prompt({"prompt": "Hello there"}, tokenizer)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1]
    expected = _expected_distribution(logits, temperature, top_k, top_p)
    counts: dict[int, int] = {}
    for call in range(5):
        batch = sample_completions(model, [prompt_ids], [call], **_kwargs(
            model, tokenizer, num_completions=200, max_new_tokens=1, stop_ids=[], temperature=temperature,
            top_k=top_k, top_p=top_p))
        for completion in batch.completions[0]:
            counts[completion[0]] = counts.get(completion[0], 0) + 1
    assert set(counts) <= set(expected), f"sampled tokens outside the distribution: {set(counts) - set(expected)}"
    n = sum(counts.values())

    def chi2(dist):
        return sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in dist.items())

    assert chi2(expected) < 20, (counts, expected)
    assert chi2(_expected_distribution(logits, 1.0, top_k, top_p) if top_p == 1 else
                {t: 1 / len(expected) for t in expected}) > 20


def test_completion_uniforms_are_per_completion_streams():
    a = completion_uniforms(0, [5, 6], 2, 4)
    assert a.shape == (4, 4) and a.dtype == torch.float64 and bool(((a >= 0) & (a < 1)).all())
    assert torch.equal(completion_uniforms(0, [6], 2, 4), a[2:])  # a prompt's streams do not depend on its batch
    assert torch.equal(completion_uniforms(0, [5], 1, 2), a[:1, :2])  # nor on K or the number of steps
    assert len({tuple(r.tolist()) for r in a}) == 4


def test_decode_keeps_the_leading_space_of_the_first_completion_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt_ids = tokenize_prompt({"prompt": "Hello"}, tokenizer)
    completion = tokenizer("Hello world", add_special_tokens=False)["input_ids"][1:]  # "▁world"
    text = decode_completion(tokenizer, prompt_ids, completion)
    assert text == " world"
    assert tokenizer("Hello" + text)["input_ids"] == prompt_ids + completion
