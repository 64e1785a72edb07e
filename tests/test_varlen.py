"""The shared-prompt attention as one varlen call (`nca_trl.shared_prompt.varlen`): gather, boundaries and bottom-right
causal masking against a dense T x T mask, its gradients, the kernels' signatures, and the whole path in a model."""

import inspect
import logging
import random
from pathlib import Path

import pytest
import torch

from nca_trl.shared_prompt import varlen
from nca_trl.shared_prompt.packing import build_shared_prompt_batch
from nca_trl.shared_prompt.varlen import (
    VarlenLayout,
    flash_attn_kernel,
    padded_varlen,
    reference_varlen,
    select_kernel,
    torch_varlen_kernel,
    varlen_attention,
    wide_heads,
)

KERNELS = {"reference": reference_varlen, "padded": padded_varlen}


def random_examples(rng: random.Random, n: int) -> list[dict]:
    """Ragged K (1-4), prompts of 1-6 tokens (1: no prefix segment), completions of 0-5 tokens (0 or 1: segments of
    one or two tokens)."""
    return [
        {
            "prompt_ids": [rng.randrange(100) for _ in range(rng.randint(1, 6))],
            "completion_ids": [[rng.randrange(100) for _ in range(rng.randint(0, 5))] for _ in range(rng.randint(1, 4))],
        }
        for _ in range(n)
    ]


def dense_mask(examples: list[dict]) -> torch.Tensor:
    """`[T, T]` True where a token of the row may attend to another, written from the examples alone: a prompt token
    sees its prompt's earlier tokens; a completion's tokens (with the repeated last prompt token in front) see their
    whole prompt prefix and their own earlier tokens."""
    owners = []  # per row position: (prompt, completion or -1 for the prefix)
    for b, e in enumerate(examples):
        owners += [(b, -1)] * (len(e["prompt_ids"]) - 1)
        for i, c in enumerate(e["completion_ids"]):
            owners += [(b, i)] * (1 + len(c))
    t = len(owners)
    mask = torch.zeros(t, t, dtype=torch.bool)
    for q, (bq, iq) in enumerate(owners):
        for k, (bk, ik) in enumerate(owners):
            mask[q, k] = bq == bk and ((ik == -1 and (iq != -1 or k <= q)) or (ik == iq and k <= q))
    return mask


def dense_attention(q, k, v, mask, scale):
    """`[T, H, D]` queries over `[T, H_kv, D]` keys with a `[T, T]` boolean mask, by hand."""
    n_rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


def qkv(t, heads, kv_heads, dim, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t, h, dim, generator=g, dtype=dtype, requires_grad=True) for h in (heads, kv_heads, kv_heads)]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_varlen_forward_and_gradients_equal_dense_mask(kernel):
    """float64, random layouts: output and dQ/dK/dV of gather + one varlen call equal dense attention over T x T."""
    fn = varlen.VarlenKernel(kernel, KERNELS[kernel])
    rng = random.Random(0)
    for trial, kv_heads in enumerate((1, 2, 4, 1, 2, 4)):
        examples = random_examples(rng, rng.randint(1, 4))
        if trial == 0:  # always covered: a prompt of one token, one-token segments, ragged K
            examples[0] = {"prompt_ids": [5], "completion_ids": [[], [7], [1, 2, 3]]}
        batch = build_shared_prompt_batch(examples, max_length=None)
        layout = VarlenLayout.from_batch(batch)
        t = batch["input_ids"].size(1)
        q, k, v = qkv(t, 4, kv_heads, 8, seed=trial)
        grad_out = torch.randn(t, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(99))
        results = []
        for out in (varlen_attention(q, k, v, layout, fn, 0.3), dense_attention(q, k, v, dense_mask(examples), 0.3)):
            results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
        for name, got, want in zip(("out", "dq", "dk", "dv"), *results):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"trial {trial} {name}")


def dense_variants(q, k, v, mask, scale, softcap=None, sinks=None):
    """`dense_attention` with Gemma 2's logit softcapping and GPT-OSS's per-head sink logits, by hand."""
    n_rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.view(-1, 1, 1).expand(-1, scores.size(1), 1)], dim=-1)
    probs = scores.softmax(-1)[..., : mask.size(1)]
    return torch.einsum("hqk,khd->qhd", probs, v)


VARIANTS = [  # (kernel, window, softcap, sinks)
    ("reference", 3, None, False), ("padded", 3, None, False), ("padded", 1, None, False),
    ("reference", None, 2.0, False), ("reference", None, None, True), ("reference", 4, 2.0, True),
]


@pytest.mark.parametrize("kernel,window,softcap,sinks", VARIANTS)
def test_attention_variants_equal_dense(kernel, window, softcap, sinks):
    """Sliding windows (the last `window` positions of the plain layout, the query's own included), softcapping and
    sinks, forward and gradients, against dense attention over the row: the window counts positions, not row
    offsets, so a completion sees the end of its prompt and not the completions before it."""
    fn = varlen._PYTORCH_PATHS[kernel]
    rng = random.Random(1)
    for trial in range(4):
        examples = random_examples(rng, rng.randint(1, 4))
        batch = build_shared_prompt_batch(examples, max_length=None)
        layout, pos = VarlenLayout.from_batch(batch), batch["position_ids"][0]
        mask = dense_mask(examples)
        if window is not None:
            mask &= pos[None, :] > pos[:, None] - window
        q, k, v = qkv(batch["input_ids"].size(1), 4, 2, 8, seed=trial)
        sink = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(trial)) if sinks else None
        got = varlen_attention(q, k, v, layout, fn, 0.3, window=window, softcap=softcap, sinks=sink)
        want = dense_variants(q, k, v, mask, 0.3, softcap, sink)
        grad_out = torch.randn_like(got)
        for name, a, b in zip(("out", "dq", "dk", "dv"), (got, *torch.autograd.grad(got, (q, k, v), grad_out)),
                              (want, *torch.autograd.grad(want, (q, k, v), grad_out))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"{kernel} trial {trial} {name}")


def test_a_kernel_runs_only_what_it_implements(monkeypatch):
    """Features by signature; a window is passed as flash-attention's `window_size=(w - 1, 0)`; a kernel missing a
    variant is refused (at the call, and by `select_kernel` / `cuda_varlen_kernel`, which skip it)."""
    seen = []

    def flash_attn_2(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
        seen.append((causal, window_size, softcap))
        return q

    def varlen_attn_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
        return query

    def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        seen.append(window_size)
        return query

    flash, torch_29, torch_211 = (flash_attn_kernel(flash_attn_2, "fa2"), torch_varlen_kernel(varlen_attn_2_9),
                                  torch_varlen_kernel(varlen_attn_2_11))
    assert flash.features == {"sliding_window", "softcap", "dropout"} and torch_211.features == {"sliding_window"}
    assert torch_29.features == frozenset() and flash.lacks({"sinks", "softcap"}) == ["sinks"]
    layout = VarlenLayout.from_batch(build_shared_prompt_batch(
        [{"prompt_ids": [1, 2, 3, 4], "completion_ids": [[5, 6, 7], [8]]}], max_length=None))
    q, k, v = qkv(9, 2, 2, 8)
    varlen_attention(q, k, v, layout, flash, window=3, softcap=5.0)
    varlen_attention(q, k, v, layout, torch_211, window=3)
    varlen_attention(q, k, v, layout, torch_211, window=7)  # 7 keys at most: the window never binds, not passed
    assert seen == [(True, (2, 0), 5.0), (2, 0), (-1, 0)]
    with pytest.raises(ValueError, match="does not implement sliding_window"):
        varlen_attention(q, k, v, layout, torch_29, window=3)
    with pytest.raises(ValueError, match="does not implement dropout"):  # attention dropout, in training
        varlen_attention(q, k, v, layout, torch_211, dropout=0.1)
    # Head widths the fused kernels do not take (FlashAttention 3/4 check a multiple of 8 and at most 256; values no
    # wider than queries, which the zero-padding of narrower values would have cropped): refused at the call
    for q_dim, v_dim in ((12, 12), (4, 4), (264, 264), (8, 16)):
        q, k, _ = qkv(9, 2, 2, q_dim)
        assert wide_heads(q, torch.zeros(9, 2, v_dim)), (q_dim, v_dim)
        with pytest.raises(ValueError, match=r"does not implement wide_heads \(heads wider than 256 dimensions, not"):
            varlen_attention(q, k, torch.zeros(9, 2, v_dim), layout, flash)
    assert [varlen.fused_head_width(*dims) for dims in ((8,), (64,), (256,), (192, 128), (80, 80))] == [True] * 5
    # Selection: the CPU default for a model with sinks and a window; a forced path that lacks one is refused
    monkeypatch.setattr(varlen, "_selected", {})
    cpu = torch.device("cpu")
    assert select_kernel(cpu, torch.float32, "eager", frozenset({"sinks"})).fn is reference_varlen
    monkeypatch.setenv(varlen.KERNEL_ENV, "padded")
    assert select_kernel(cpu, torch.float32, "sdpa", frozenset({"sliding_window"})).fn is padded_varlen
    with pytest.raises(ValueError, match="does not implement softcap"):
        select_kernel(cpu, torch.float32, "eager", frozenset({"softcap"}))
    monkeypatch.delenv(varlen.KERNEL_ENV)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: False)
    import torch.nn.attention.varlen as torch_varlen

    monkeypatch.setattr(torch_varlen, "varlen_attn", varlen_attn_2_11)
    assert varlen.cuda_varlen_kernel("sdpa", needs=frozenset({"sliding_window"}))[0] is not None
    kernel, why = varlen.cuda_varlen_kernel("sdpa", needs=frozenset({"sinks"}))
    assert kernel is None and "does not implement sinks" in why
    # Attention dropout (a training forward of GPT-BigCode, whose attn_pdrop TRL's disable_dropout leaves on): not
    # torch's varlen_attn, which has none (the first training step raised on a GPU), but the padded PyTorch path
    kernel, why = varlen.cuda_varlen_kernel("sdpa", needs=frozenset({"dropout"}))
    assert kernel is None and "does not implement dropout" in why
    assert select_kernel(torch.device("cuda"), torch.bfloat16, "sdpa", frozenset({"dropout"})).fn is padded_varlen
    monkeypatch.setenv(varlen.KERNEL_ENV, "torch")
    assert "does not implement dropout" in varlen.forced_kernel_problem(frozenset({"dropout"}), "cuda", True)


def test_varlen_gradcheck():
    examples = [{"prompt_ids": [1, 2, 3], "completion_ids": [[4], [5, 6]]}, {"prompt_ids": [7], "completion_ids": [[8]]}]
    layout = VarlenLayout.from_batch(build_shared_prompt_batch(examples, max_length=None))
    q, k, v = qkv(layout.cu_seqlens_q[-1].item(), 2, 1, 3, seed=1)
    for name in KERNELS:
        kernel = varlen._PYTORCH_PATHS[name]  # heads 3 wide: which the PyTorch paths take, the fused kernels not
        assert torch.autograd.gradcheck(
            lambda q, k, v, kernel=kernel: varlen_attention(q, k, v, layout, kernel), (q, k, v), fast_mode=True
        ), name


def test_layout_integers_and_truncation():
    examples = [{"prompt_ids": [1, 2, 3, 4], "completion_ids": [[5, 6, 7, 8], [9]]}]
    batch = build_shared_prompt_batch(examples, max_length=6)  # completions cut to 6 - 4 = 2 tokens
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 4, 9]]
    assert batch["cu_seqlens_q"].tolist() == [0, 3, 6, 8] and batch["cu_seqlens_q"].dtype == torch.int32
    assert batch["cu_seqlens_k"].tolist() == [0, 3, 9, 14] and batch["cu_seqlens_k"].dtype == torch.int32
    assert batch["kv_index"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2, 6, 7]
    assert (batch["max_seqlen_q"], batch["max_seqlen_k"]) == (3, 6)
    assert type(batch["max_seqlen_q"]) is int and type(batch["max_seqlen_k"]) is int


# ------------------------------------------------------------------------------------------------ CUDA kernels
def _fake(causal_of, gqa_of=lambda kw: False, scale_of=lambda kw: None, calls=None):
    """A stand-in for a CUDA kernel: checks what it is given, then computes with causal bottom-right masking only if
    `causal_of(kwargs)` says so (no masking at all otherwise, which the test's comparison would catch)."""

    def run(q, k, v, cu_q, cu_k, max_q, max_k, kwargs):
        assert cu_q.dtype == cu_k.dtype == torch.int32
        assert type(max_q) is int and type(max_k) is int
        assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
        assert v.size(-1) == q.size(-1), "the fused kernels take one head dim for queries, keys and values"
        if k.size(1) != q.size(1):
            assert gqa_of(kwargs), "fewer key/value heads without GQA"
            k, v = k.repeat_interleave(q.size(1) // k.size(1), 1), v.repeat_interleave(q.size(1) // k.size(1), 1)
        calls.append(kwargs)
        if causal_of(kwargs):
            return reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale_of(kwargs))
        bq, bk = cu_q.tolist(), cu_k.tolist()
        return torch.cat([
            torch.nn.functional.scaled_dot_product_attention(
                q[bq[s]:bq[s + 1]].transpose(0, 1), k[bk[s]:bk[s + 1]].transpose(0, 1), v[bk[s]:bk[s + 1]].transpose(0, 1),
                scale=scale_of(kwargs),
            ).transpose(0, 1) for s in range(len(bq) - 1)
        ])

    return run


def signatures(calls):
    """Kernels in every signature `nca_trl.shared_prompt.varlen` supports, as (kind, function)."""
    torch_29 = _fake(lambda kw: kw["is_causal"] is True, calls=calls)
    torch_210 = _fake(lambda kw: tuple(kw["window_size"]) == (-1, 0), scale_of=lambda kw: kw["scale"], calls=calls)
    torch_213 = _fake(
        lambda kw: tuple(kw["window_size"]) == (-1, 0), gqa_of=lambda kw: kw["enable_gqa"],
        scale_of=lambda kw: kw["scale"], calls=calls,
    )
    flash = _fake(lambda kw: kw["causal"] is True, gqa_of=lambda kw: True, scale_of=lambda kw: kw["softmax_scale"],
                  calls=calls)

    def varlen_attn_2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        return torch_29(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, {"is_causal": is_causal})

    def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                         window_size=(-1, -1), k_cache=None, v_cache=None, cache_seqlens=None, page_table=None):
        return torch_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, {"scale": scale, "window_size": window_size})

    def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                         window_size=(-1, -1)):  # as read on an H200 with torch 2.11.0+cu130
        return torch_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, {"scale": scale, "window_size": window_size})

    def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                         window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        return torch_213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                         {"scale": scale, "window_size": window_size, "enable_gqa": enable_gqa})

    def flash_attn_2(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                     deterministic=False, return_attn_probs=False, block_table=None):
        return flash(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     {"causal": causal, "softmax_scale": softmax_scale, "dropout_p": dropout_p})

    def flash_attn_3(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None, seqused_k=None,
                     softmax_scale=None, causal=False, qv=None, window_size=(-1, -1), deterministic=False):
        out = flash(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    {"causal": causal, "softmax_scale": softmax_scale})
        return out, torch.zeros(1)  # (out, softmax_lse)

    return [
        ("torch 2.9", torch_varlen_kernel(varlen_attn_2_9)),
        ("torch 2.10", torch_varlen_kernel(varlen_attn_2_10)),
        ("torch 2.11", torch_varlen_kernel(varlen_attn_2_11)),
        ("torch 2.13", torch_varlen_kernel(varlen_attn_2_13)),
        ("flash_attn 2", flash_attn_kernel(flash_attn_2, "flash_attn_2")),
        ("flash_attn 3", flash_attn_kernel(flash_attn_3, "flash_attn_3")),
    ]


def test_cuda_kernels_get_int32_boundaries_integer_maxima_and_causal_bottom_right():
    calls = []
    examples = [{"prompt_ids": [1, 2, 3, 4], "completion_ids": [[5, 6], [7], []]}, {"prompt_ids": [8], "completion_ids": [[9]]}]
    layout = VarlenLayout.from_batch(build_shared_prompt_batch(examples, max_length=None))
    t = layout.cu_seqlens_q[-1].item()
    want = {}
    for kv_heads in (1, 4):
        q, k, v = qkv(t, 4, kv_heads, 8, seed=kv_heads)
        want[kv_heads] = dense_attention(q, k, v, dense_mask(examples), 0.2).detach()
    for kind, kernel in signatures(calls):
        assert kernel.cuda
        for kv_heads in (1, 4):
            q, k, v = qkv(t, 4, kv_heads, 8, seed=kv_heads)
            calls.clear()
            out = varlen_attention(q, k, v, layout, kernel, scale=0.2)
            assert len(calls) == 1, kind  # one call per layer
            torch.testing.assert_close(out.detach(), want[kv_heads], rtol=1e-10, atol=1e-10, msg=kind)
        if kind == "torch 2.9":  # no `scale`: the queries were pre-scaled so that its 1/sqrt(D) gives 0.2
            assert "scale" not in calls[-1]


def test_cuda_kernels_take_values_narrower_than_queries():
    """Multi-head latent attention (DeepSeek-V3, GLM-4.7-Flash) has values narrower than its queries and keys; the
    fused kernels take one head dim, so the values are padded with zeros and the output cropped, as transformers'
    own flash-attention integration does."""
    calls = []
    examples = [{"prompt_ids": [1, 2, 3, 4], "completion_ids": [[5, 6], [7], []]}, {"prompt_ids": [8], "completion_ids": [[9]]}]
    layout = VarlenLayout.from_batch(build_shared_prompt_batch(examples, max_length=None))
    t = layout.cu_seqlens_q[-1].item()
    q, k, _ = qkv(t, 4, 4, 16, seed=1)
    v = torch.randn(t, 4, 8, dtype=torch.float64)
    want = dense_attention(q, k, v, dense_mask(examples), 0.2)
    for kind, kernel in signatures(calls):
        out = varlen_attention(q, k, v, layout, kernel, scale=0.2)
        assert out.shape == (t, 4, 8), kind
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, msg=kind)
    for name in ("reference", "padded"):
        out = varlen_attention(q, k, v, layout, varlen._PYTORCH_PATHS[name], scale=0.2)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, msg=name)


def test_kernel_order_on_cuda(monkeypatch, caplog):
    """On CUDA in bf16: the model's flash implementation (via transformers' lazy import), then the flash_attn package,
    then torch's varlen_attn; float32 or no kernel: the padded SDPA path; the CPU: `CPU_KERNEL`. Logged once."""
    import torch.nn.attention.varlen as torch_varlen
    import transformers.modeling_flash_attention_utils as fa_utils

    calls = []
    kinds = dict(signatures(calls))
    flash_fn = inspect.unwrap(kinds["flash_attn 2"].fn)  # any function with flash_attn's signature will do

    def fake_flash(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                   softmax_scale=None, causal=False):
        return flash_fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, 0.0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fa_utils, "flash_attn_supports_top_left_mask", lambda: False)
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", lambda impl: ((None, fake_flash, None, None, None), None))
    monkeypatch.setattr(varlen, "_selected", {})
    cuda = torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="nca_trl"):
        assert select_kernel(cuda, torch.bfloat16, "flash_attention_2").name == "flash_attn_varlen_func (flash_attention_2)"
        select_kernel(cuda, torch.bfloat16, "flash_attention_2")
    assert caplog.text.count("Shared-prompt attention on cuda (bfloat16): flash_attn_varlen_func") == 1
    # sdpa model, no flash_attn package: torch's varlen_attn, in this torch's signature
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: False)
    kernel = select_kernel(cuda, torch.bfloat16, "sdpa")
    assert kernel.name == "torch.nn.attention.varlen.varlen_attn" and kernel.cuda
    # float32 on CUDA, an old GPU, or the CPU: the PyTorch paths
    assert select_kernel(cuda, torch.float32, "sdpa").fn is padded_varlen
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert select_kernel(cuda, torch.float16, "sdpa").fn is padded_varlen
    assert select_kernel(torch.device("cpu"), torch.float32, "flash_attention_2").fn is KERNELS[varlen.CPU_KERNEL]
    monkeypatch.delattr(torch_varlen, "varlen_attn")
    assert varlen.cuda_varlen_kernel("sdpa")[0] is None
    monkeypatch.setenv(varlen.KERNEL_ENV, "padded")
    assert select_kernel(torch.device("cpu"), torch.float32, "sdpa").fn is padded_varlen
    monkeypatch.setenv(varlen.KERNEL_ENV, "nope")
    with pytest.raises(ValueError, match="NCA_TRL_VARLEN_KERNEL='nope'"):
        select_kernel(torch.device("cpu"), torch.float32, "sdpa")


def test_shared_prompt_help_states_the_gpu_rule_and_its_evidence():
    """The automatic rule on a GPU is what results/gpu_layouts.json measured: with torch's varlen_attn the
    shared-prompt layout beat the plain one on both workloads, and took every batch under `shared_prompt=None`."""
    import json
    from dataclasses import fields

    from nca_trl import NCAConfig

    help_text = next(f for f in fields(NCAConfig) if f.name == "shared_prompt").metadata["help"]
    assert "fused varlen kernel" in help_text and "results/gpu_layouts.json" in help_text
    measured = json.loads((Path(__file__).resolve().parents[1] / "results" / "gpu_layouts.json").read_text())
    for workload in ("long", "vicuna"):
        systems = measured["workloads"][workload]["systems"]
        assert systems["d:auto"]["tokens_per_second"] > 2.5 * systems["c"]["tokens_per_second"], workload
        assert "varlen_attn" in systems["d:auto"]["kernel"]


def test_autocast_gives_the_kernel_one_dtype():
    """Under bf16 autocast the rotary embedding leaves float32 queries and keys beside bf16 values: the attention
    takes the autocast dtype, as SDPA does in the plain layout."""
    from types import SimpleNamespace

    from nca_trl.shared_prompt.packing import shared_prompt_attention

    examples = [{"prompt_ids": [1, 2, 3], "completion_ids": [[4, 5], [6]]}]
    layout = VarlenLayout.from_batch(build_shared_prompt_batch(examples, max_length=None))
    q, k, v = (x.detach().float() for x in qkv(7, 4, 2, 8, seed=3))
    module = SimpleNamespace(config=SimpleNamespace(_attn_implementation="nca_shared_prompt|sdpa"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = shared_prompt_attention(
            module, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.bfloat16().transpose(0, 1)[None], None,
            scaling=0.3, nca_layout=layout,
        )
    assert out.dtype == torch.bfloat16 and out.shape == (1, 7, 4, 8)
    torch.testing.assert_close(out[0].float(), dense_attention(q, k, v, dense_mask(examples), 0.3), rtol=0, atol=3e-2)


def test_models_with_heads_the_fused_kernels_do_not_take():
    """At construction, a model whose heads are not a multiple of 8 wide (a tiny config's 12) has the `wide_heads`
    variant, as Gemma 4's 512-wide heads do: on a GPU its automatic layout is plain, a forced one runs the PyTorch
    path, instead of failing inside FlashAttention 3/4 or torch's varlen kernel at the first step."""
    from transformers import MistralConfig, MistralForCausalLM

    from nca_trl.shared_prompt.families import attention_variants

    def model(hidden, heads):
        return MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=hidden, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=1))

    assert "wide_heads" in attention_variants(model(48, 4))  # 12 wide
    assert "wide_heads" not in attention_variants(model(64, 4))  # 16 wide


def test_the_layout_follows_the_queries_to_their_device():
    """A model split over several GPUs (`device_map`): accelerate's hooks move each layer's arguments with
    `send_to_device`, which moves only tensors, containers and objects with `.to`, so the layout stayed on the first
    GPU and the next GPU's layers indexed across devices. It moves (here to `meta`, the device a CPU has besides its
    own), by the hooks and at the call."""
    from accelerate.utils import send_to_device

    layout = VarlenLayout.from_batch(build_shared_prompt_batch(
        [{"prompt_ids": [1, 2, 3, 4], "completion_ids": [[5, 6, 7], [8]]}], max_length=None))
    moved = send_to_device({"nca_layout": layout}, "meta")["nca_layout"]
    assert {t.device.type for t in (moved.cu_seqlens_q, moved.cu_seqlens_k, moved.kv_index)} == {"meta"}
    assert (moved.cu_seqlens_q.dtype, moved.kv_index.dtype, moved.max_seqlen_k) == (torch.int32, torch.int64, 7)
    assert layout.kv_index.device.type == "cpu"  # a copy: the row's own layout is left as it was
    seen = []

    def kernel(q, k, v, cu_q, cu_k, *rest, **kwargs):
        seen.append({t.device.type for t in (k, cu_q, cu_k)})
        return q

    q, k, v = (t.to("meta") for t in qkv(9, 2, 2, 8))
    varlen_attention(q, k, v, layout, varlen.VarlenKernel("stand-in", kernel))
    assert seen == [{"meta"}]


def test_sinks_in_the_wider_dtype_as_gpt_oss_eager():
    """GPT-OSS's eager attention concatenates bf16 scores with its sink logits as they are (float32 weights under
    autocast), so the softmax runs in float32; the reference path cast the sinks down to bf16 instead. One segment,
    no mask needed beyond causal: the same numbers as transformers' GPT-OSS attention."""
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.bfloat16) for _ in range(3))
    sinks = torch.randn(2, dtype=torch.float32) * 3
    causal = torch.full((6, 6), float("-inf")).triu(1).to(torch.bfloat16)
    module = SimpleNamespace(sinks=sinks, num_key_value_groups=1, training=False)
    want = eager_attention_forward(module, q, k, v, causal[None, None], scaling=8 ** -0.5)[0]  # [1, 6, 2, 8]
    cu = torch.tensor([0, 6], dtype=torch.int32)
    got = reference_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu, 6, 6,
                           scale=8 ** -0.5, sinks=sinks)
    torch.testing.assert_close(got[None], want, rtol=0, atol=0)
