"""The PyTorch paths of the shared-prompt layout's varlen attention (`nca_trl.shared_prompt.varlen`): the same gather
and segment boundaries as the fused kernels, in SDPA calls that run anywhere, every attention variant included.

- `reference_varlen`: per segment, SDPA with a bottom-right causal mask (softcapping and sinks written out as Gemma 2's
  and GPT-OSS's eager attention computes them); the exact stand-in for the CUDA kernels in the tests;
- `padded_varlen`: the prompt prefixes padded into one causal SDPA call, the completions into one masked call.

Both take `VarlenKernel.fn`'s signature; neither has a limit on the head width (`wide_heads`).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

__all__ = ["padded_varlen", "reference_varlen", "repeat_kv"]


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[L, H_kv, D]` -> `[L, heads, D]` (or `[S, H_kv, L, D]` -> `[S, heads, L, D]`: the heads are dim 1), query head
    h reading key/value head `h // (heads // H_kv)` (transformers' `repeat_kv`)."""
    n_rep = heads // x.size(1)
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Whether the key at position `k_pos` is visible to the query at `q_pos` (broadcast): causal, and within the
    last `window` keys (transformers' sliding-window rule `kv > q - window`)."""
    visible = k_pos <= q_pos
    return visible if window is None else visible & (k_pos > q_pos - window)


def _eager_segment(q, k, v, visible, scale, dropout, softcap, sinks):
    """`[1, H, Lq, D]` attention by hand, as the eager attention of Gemma 2 (softcap) and GPT-OSS (sinks) computes it:
    scores, softcapped, masked, a sink logit per head appended to each softmax and dropped after it."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # in the wider of the two dtypes, as GPT-OSS's `torch.cat` promotes (bf16 scores, fp32 sinks)
        dtype = torch.promote_types(scores.dtype, sinks.dtype)
        sink = sinks.to(dtype).reshape(1, -1, 1, 1).expand(1, -1, scores.size(2), 1)
        scores = torch.cat([scores.to(dtype), sink], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
    probs = scores.softmax(dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs.to(v.dtype), v)


def reference_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None, dropout=0.0, window=None,
    softcap=None, sinks=None,
):
    """Per segment: SDPA with `causal_lower_right(Lq, Lk)` (or the sliding-window mask) and repeated key/value heads;
    with softcapping or sinks, the same attention written out (`_eager_segment`). Exact and differentiable (the
    stand-in for the CUDA kernels in the tests); reads the boundaries on the host."""
    from torch.nn.attention.bias import causal_lower_right

    heads = q.size(1)
    scale = q.size(-1) ** -0.5 if scale is None else scale
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = []
    for s in range(len(bq) - 1):
        qs = q[bq[s] : bq[s + 1]].transpose(0, 1).unsqueeze(0)  # [1, H, Lq, D]
        ks = repeat_kv(k[bk[s] : bk[s + 1]], heads).transpose(0, 1).unsqueeze(0)  # [1, H, Lk, D]
        vs = repeat_kv(v[bk[s] : bk[s + 1]], heads).transpose(0, 1).unsqueeze(0)
        lq, lk = qs.size(2), ks.size(2)
        if lq > lk:
            raise ValueError(f"segment {s} has {lq} queries but only {lk} keys")
        if window is None and softcap is None and sinks is None:
            mask = causal_lower_right(lq, lk)
        else:  # query j sits at key position lk - lq + j (bottom-right)
            positions = torch.arange(lk, device=q.device)
            mask = _visible(positions[lk - lq :, None], positions, window)
        if softcap is None and sinks is None:
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout, scale=scale)
        else:
            o = _eager_segment(qs, ks, vs, mask, scale, dropout, softcap, sinks)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def padded_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None, dropout=0.0, window=None,
):
    """The segments padded into two batches, one SDPA call each: the segments with as many keys as queries (prompt
    prefixes) with `is_causal=True` and no mask (padding comes last, so no real query sees it; a sliding window makes
    it a boolean mask), the others (completions after their prompt) with a boolean bottom-right causal mask and the
    key/value heads repeated (masked SDPA with `enable_gqa=True` has no fused CUDA kernel and falls back to the float32
    "math" kernel). The old per-segment-kind attention of this layout, fed from the varlen boundaries; reads them on
    the host."""
    heads = q.size(1)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lq = [b - a for a, b in itertools.pairwise(bq)]
    lk = [b - a for a, b in itertools.pairwise(bk)]
    outputs, rows = [], []
    for square in (True, False):
        segments = [s for s in range(len(lq)) if (lq[s] == lk[s]) is square]
        if not segments:
            continue
        n_q = torch.tensor([lq[s] for s in segments]).view(-1, 1)
        n_k = torch.tensor([lk[s] for s in segments]).view(-1, 1)
        jq, jk = torch.arange(int(n_q.max())), torch.arange(int(n_k.max()))
        q_real, k_real = jq < n_q, jk < n_k  # [S_g, Lq], [S_g, Lk]
        q_rows = torch.where(q_real, torch.tensor([bq[s] for s in segments]).view(-1, 1) + jq, 0).to(q.device)
        k_rows = torch.where(k_real, torch.tensor([bk[s] for s in segments]).view(-1, 1) + jk, 0).to(q.device)
        qs = q[q_rows].transpose(1, 2)  # [S_g, H, Lq, D]
        ks, vs = k[k_rows].transpose(1, 2), v[k_rows].transpose(1, 2)  # [S_g, H_kv, Lk, D]
        if square and window is None:
            out = F.scaled_dot_product_attention(
                qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=ks.size(1) != heads
            )
        else:
            ks, vs = repeat_kv(ks, heads), repeat_kv(vs, heads)
            # Query j sits at key position n_k - n_q + j (bottom-right); padded queries see key 0 only (no NaN rows)
            mask = k_real[:, None, :] & _visible((n_k - n_q)[:, :, None] + jq[None, :, None], jk[None, None, :], window)
            mask = torch.where(q_real[:, :, None], mask, (jk == 0)[None, None, :])
            out = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask[:, None].to(q.device), dropout_p=dropout, scale=scale
            )
        real = q_real.flatten().nonzero().squeeze(1).to(q.device)
        outputs.append(out.transpose(1, 2).reshape(-1, heads, v.size(-1)).index_select(0, real))
        rows.append(q_rows.flatten().index_select(0, real))
    # Both groups' real queries, back in row order
    return torch.cat(outputs).index_select(0, torch.cat(rows).argsort())
