"""Shared-prompt, padding-free layout: each prompt encoded once, followed by its K completions, in one flat row.

The plain layout forwards `prompt + completion_i` K times and pads every sequence to the longest of the batch. Here
all tokens of the batch go into a single row of `T` real tokens, with no padding. For each prompt `P` (length p) and
its completions `c_1..c_K` the row holds

    P[0 .. p-2]  |  P[p-1] c_1  |  P[p-1] c_2  |  ...  |  P[p-1] c_K

The last prompt token is repeated in front of each completion so that, as in the plain layout, the position that
predicts `c_i[0]` has exactly one next-token label. Position ids continue from the prompt end for every completion,
so the rotary embeddings see the same positions as in the plain layout.

Attention: a completion attends to the shared prompt prefix and causally to its own tokens, never to the other
completions or to other prompts. The model's linear layers (most of the FLOPs) run on the `T` real tokens only; the
attention itself is computed per *segment* (a prompt prefix, or one completion with its prompt as context) by a
function registered in transformers' `AttentionInterface`, which gathers each segment's queries and keys into a
small padded batch and runs `torch.nn.functional.scaled_dot_product_attention` on it. Models that do not dispatch
their attention through that interface fall back to the plain layout (see `enable_shared_prompt`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger("nca_trl")

__all__ = [
    "build_shared_prompt_batch",
    "enable_shared_prompt",
    "is_shared_prompt_enabled",
    "shared_prompt_attention",
    "LAYOUT_KEYS",
]

# Batch keys of the shared-prompt layout that the attention function reads (passed to the model as `nca_layout`)
LAYOUT_KEYS = ("segment_q_index", "segment_kv_index", "segment_mask", "segment_q_real")
_PREFIX = "nca_shared_prompt|"


def build_shared_prompt_batch(examples: list[dict], max_length: int | None) -> dict[str, torch.Tensor]:
    """Lay out a batch of tokenized rated examples as one flat row (see the module docstring).

    Args:
        examples: dicts with `prompt_ids` (at least one token) and `completion_ids` (K_b lists).
        max_length: each `prompt + completion` is cut to `max_length` tokens from its start, as in the plain layout.

    Returns:
        - `input_ids`, `position_ids`, `shift_labels` (`-100` where nothing is scored): `[1, T]`;
        - `token_sequence`: `[T]`, the sequence index (slot-major, as in the plain layout) a scored token belongs to,
          -1 elsewhere; `token_column` `[T]` and `plain_width` (scalar): the column of the token's log-prob in the plain
          layout's `[N, L - 1]` per-token tensor, and `L - 1`, so that sequence sums can be taken in the same order;
        - per group of attention segments (the prompt prefixes, then the completions, each padded on its own), lists
          of `segment_q_index` `[S, Lq]`, `segment_kv_index` `[S, Lkv]`: token positions of each segment's queries
          and keys (padded with 0), `segment_mask` `[S, 1, Lq, Lkv]`: True where a query attends to a key,
          `segment_q_real` `[S, Lq]`: True for the real (not padded) queries.
    """
    ids, pos, labels, seq, column = [], [], [], [], []
    segments = []  # (query positions, key positions, number of context keys before the segment's own tokens)
    k_max = max(len(e["completion_ids"]) for e in examples)
    # Sequence numbers in slot-major order: completion i of prompt b is sequence seq_no[b][i]
    seq_no, n = [[None] * len(e["completion_ids"]) for e in examples], 0
    for i in range(k_max):
        for b, e in enumerate(examples):
            if i < len(e["completion_ids"]):
                seq_no[b][i], n = n, n + 1

    plain_width = 0
    for b, e in enumerate(examples):
        prompt = e["prompt_ids"]
        p = len(prompt)
        if p == 0:
            raise ValueError("the shared-prompt layout needs at least one prompt token (e.g. BOS) per example")
        start = len(ids)
        prefix = list(range(start, start + p - 1))
        ids += prompt[:-1]
        pos += list(range(p - 1))
        labels += [-100] * (p - 1)
        seq += [-1] * (p - 1)
        column += [-1] * (p - 1)
        if prefix:
            segments.append((prefix, prefix, 0))
        for i, completion in enumerate(e["completion_ids"]):
            if max_length is not None:
                completion = completion[: max(max_length - p, 0)]
            own = [prompt[-1]] + completion
            first = len(ids)
            ids += own
            pos += list(range(p - 1, p - 1 + len(own)))
            labels += completion + [-100]
            seq += [seq_no[b][i]] * len(completion) + [-1]
            # Where the plain layout keeps this token's log-prob: column p - 1 + j of its [N, L - 1] per-token row
            column += list(range(p - 1, p - 1 + len(completion))) + [-1]
            plain_width = max(plain_width, p + len(completion) - 1)
            own_positions = list(range(first, first + len(own)))
            segments.append((own_positions, prefix + own_positions, len(prefix)))

    # Prompt prefixes and completions have very different lengths: each kind is its own padded attention batch
    groups = [g for g in ([x for x in segments if x[2] == 0], [x for x in segments if x[2] > 0]) if g]
    tensors = [_segment_tensors(group) for group in groups]

    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([pos]),
        "shift_labels": torch.tensor([labels]),
        "token_sequence": torch.tensor(seq),
        "token_column": torch.tensor(column),
        "plain_width": torch.tensor(plain_width),
        **{key: [t[i] for t in tensors] for i, key in enumerate(LAYOUT_KEYS)},
    }


def _segment_tensors(segments: list[tuple[list[int], list[int], int]]) -> tuple[torch.Tensor, ...]:
    """Padded index and mask tensors of a group of attention segments (query positions, key positions, context)."""
    lq = max(len(q) for q, _, _ in segments)
    lkv = max(len(kv) for _, kv, _ in segments)
    q_index = torch.zeros(len(segments), lq, dtype=torch.long)
    kv_index = torch.zeros(len(segments), lkv, dtype=torch.long)
    for s, (q, kv, _) in enumerate(segments):
        q_index[s, : len(q)] = torch.tensor(q)
        kv_index[s, : len(kv)] = torch.tensor(kv)
    q_len = torch.tensor([len(q) for q, _, _ in segments]).view(-1, 1, 1)
    kv_ctx = torch.tensor([c for _, _, c in segments]).view(-1, 1, 1)
    kv_len = torch.tensor([len(kv) for _, kv, _ in segments]).view(-1, 1, 1)
    # Query j of a segment sees the context and its own keys 0..j; padded queries see key 0 only (no NaN rows)
    qj = torch.arange(lq).view(1, lq, 1)
    kj = torch.arange(lkv).view(1, 1, lkv)
    mask = (kj < kv_len) & (kj <= kv_ctx + qj)
    mask |= (qj >= q_len) & (kj == 0)
    return q_index, kv_index, mask.unsqueeze(1), torch.arange(lq).view(1, lq) < q_len.view(-1, 1)


def shared_prompt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over the segments of a shared-prompt row; any other call goes to the original implementation.

    `query` is `[1, H, T, D]`, `key`/`value` `[1, H_kv, T, D]`; returns `[1, T, H, D]` like transformers' kernels.
    """
    layout = kwargs.pop("nca_layout", None)
    if layout is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        original = module.config._attn_implementation[len(_PREFIX) :]
        if original == "eager":
            from transformers.models.llama.modeling_llama import eager_attention_forward as original_fn
        else:
            original_fn = ALL_ATTENTION_FUNCTIONS[original]
        return original_fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    _, heads, t, d = query.shape
    final = torch.empty(t, heads, d, dtype=query.dtype, device=query.device)
    for q_index, kv_index, mask, q_real in zip(*(layout[k] for k in LAYOUT_KEYS)):
        if kwargs.get("sliding_window") is not None and kv_index.size(1) > kwargs["sliding_window"]:
            raise ValueError("a segment is longer than the model's sliding window: use the plain layout")
        q = query[0][:, q_index].transpose(0, 1)  # [S, H, Lq, D]
        k = key[0][:, kv_index].transpose(0, 1)  # [S, H_kv, Lkv, D]
        v = value[0][:, kv_index].transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=k.size(1) != heads
        )  # [S, H, Lq, D]
        # Scatter the segments' real queries back to their token positions (every token is the query of one segment)
        final = final.index_copy(0, q_index[q_real], out.transpose(1, 2)[q_real].to(final.dtype))
    return final.unsqueeze(0), None


def _register(original: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _PREFIX + original
    ALL_ATTENTION_FUNCTIONS.register(name, shared_prompt_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


@dataclass
class SharedPromptSupport:
    enabled: bool
    reason: str = ""


def enable_shared_prompt(model) -> SharedPromptSupport:
    """Route `model`'s attention through `shared_prompt_attention` if it can take the layout.

    Supported: decoder-only models whose attention modules dispatch through transformers' `AttentionInterface` with
    the `eager` or `sdpa` implementation, without sliding-window layers shorter than the sequences (checked per
    batch). Anything else returns `enabled=False` and the reason, and the caller keeps the plain layout.
    """
    config = model.config.get_text_config()
    implementation = config._attn_implementation or "eager"
    if implementation.startswith(_PREFIX):
        return SharedPromptSupport(True)
    peft_config = getattr(model, "peft_config", None)
    if peft_config and any(c.is_prompt_learning for c in peft_config.values()):
        return SharedPromptSupport(False, "prompt-learning PEFT adds virtual tokens to every sequence")
    if implementation not in ("eager", "sdpa"):
        return SharedPromptSupport(False, f"attention implementation {implementation!r} is not eager or sdpa")
    if config is not model.config:
        return SharedPromptSupport(False, "multimodal models are not supported")
    module_names = {type(m).__module__ for m in model.modules() if type(m).__name__.endswith("Attention")}
    if not module_names or not all(_uses_attention_interface(name) for name in module_names):
        return SharedPromptSupport(False, f"{type(model).__name__} does not dispatch attention via AttentionInterface")
    config._attn_implementation = _register(implementation)
    return SharedPromptSupport(True)


def is_shared_prompt_enabled(model) -> bool:
    """Whether `model`'s attention was routed through `shared_prompt_attention` by `enable_shared_prompt`."""
    return (model.config.get_text_config()._attn_implementation or "").startswith(_PREFIX)


def _uses_attention_interface(module_name: str) -> bool:
    import sys

    source = getattr(sys.modules.get(module_name), "__file__", None)
    if source is None:
        return False
    with open(source) as f:
        return "ALL_ATTENTION_FUNCTIONS.get_interface" in f.read()
