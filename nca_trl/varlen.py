"""Variable-length attention for the shared-prompt layout: one kernel call per layer, and the kernels that take it.

The shared-prompt row (`nca_trl.packing`) is a sequence of S *segments*, contiguous in the row: a prompt's prefix
(its tokens but the last), then each of its completions (the last prompt token and the completion). A prefix attends
causally to itself; a completion attends to its whole prompt prefix and causally to itself. One varlen call does all
of it:

- queries stay in row order, `cu_seqlens_q` `[S + 1]` holding the segments' boundaries in the row;
- keys and values are gathered (`kv_index` `[T_k]`, row positions) so that segment s's keys are
  `[its prompt's prefix keys; its own keys]` (a prefix: its own keys only), `cu_seqlens_k` `[S + 1]` over that tensor;
- causal masking aligned *bottom-right* (flash-attention's rule when a segment has more keys than queries: query j of
  a segment with Lq queries and Lk keys sees keys `0 .. Lk - Lq + j`) is then exactly "the whole prompt, and causally
  itself". The output is in row order already; the prompt keys' gradients add up in the gather's backward.

The collator builds `cu_seqlens_*` (int32), `kv_index` and the maxima (Python ints) on the CPU (`VarlenLayout`), so
that a CUDA kernel's forward never waits for the host.

Kernels, in the order they are tried (the one chosen is logged once per device and dtype):

1. on CUDA, in float16/bfloat16: the model's own flash-attention implementation (`attn_implementation` =
   `flash_attention_2/3/4` or a hub kernel, loaded by transformers' `lazy_import_flash_attention`), else the
   `flash_attn` package's `flash_attn_varlen_func`;
2. on CUDA (compute capability 8.0+), in float16/bfloat16: `torch.nn.attention.varlen.varlen_attn` (torch 2.9+; its
   signature differs between torch versions and is read with `inspect.signature`; the key/value heads are repeated
   where it has no `enable_gqa`, the queries pre-scaled where it has no `scale`);
3. anywhere else: a PyTorch path that runs the same gather and boundaries: `reference_varlen` (per segment, SDPA with
   `torch.nn.attention.bias.causal_lower_right`, key/value heads repeated) or `padded_varlen` (the prompt prefixes
   padded into one causal SDPA call, the completions into one masked SDPA call with repeated key/value heads).
   `CPU_KERNEL` is the CPU default, the faster of the two in `results/benchmark_layouts_cpu.json`; CUDA without a
   varlen kernel (or in float32) uses `padded_varlen`.

`NCA_TRL_VARLEN_KERNEL` (`flash_attn`, `torch`, `reference` or `padded`) forces one of them.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger("nca_trl")

__all__ = [
    "CPU_KERNEL",
    "KERNEL_ENV",
    "VarlenKernel",
    "VarlenLayout",
    "cuda_varlen_kernel",
    "flash_attn_kernel",
    "padded_varlen",
    "reference_varlen",
    "reset_kernel_choices",
    "select_kernel",
    "selected_kernels",
    "torch_varlen_kernel",
    "varlen_attention",
]

KERNEL_ENV = "NCA_TRL_VARLEN_KERNEL"
# The CPU default, the faster PyTorch path in results/benchmark_layouts_cpu.json (docs/trainers.md lists the order)
CPU_KERNEL = "reference"
_FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


@dataclass
class VarlenLayout:
    """The integers one varlen call needs, built on the CPU by the collator (`nca_trl.packing`).

    - `cu_seqlens_q` `[S + 1]` int32: segment boundaries in the row (`cu_seqlens_q[-1] == T`);
    - `cu_seqlens_k` `[S + 1]` int32: boundaries of each segment's keys in the gathered key tensor;
    - `kv_index` `[T_k]` int64: the row position of every gathered key (`T_k == cu_seqlens_k[-1]`);
    - `max_seqlen_q`, `max_seqlen_k`: Python ints, the longest segment's queries and keys.
    """

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    kv_index: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int

    KEYS = ("cu_seqlens_q", "cu_seqlens_k", "kv_index", "max_seqlen_q", "max_seqlen_k")

    @classmethod
    def from_batch(cls, batch) -> VarlenLayout:
        return cls(**{key: batch[key] for key in cls.KEYS})

    @classmethod
    def from_segments(cls, segments: list[tuple[int, int, list[int]]]) -> VarlenLayout:
        """From `(start, length, key positions)` of each segment, in row order (contiguous: each starts where the
        previous ends)."""
        cu_q, cu_k, kv = [0], [0], []
        for start, length, keys in segments:
            if start != cu_q[-1]:
                raise ValueError(f"segments must tile the row in order: one starts at {start}, expected {cu_q[-1]}")
            cu_q.append(start + length)
            cu_k.append(cu_k[-1] + len(keys))
            kv += keys
        return cls(
            cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32),
            cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
            kv_index=torch.tensor(kv, dtype=torch.long),
            max_seqlen_q=max((n for _, n, _ in segments), default=0),
            max_seqlen_k=max((len(k) for _, _, k in segments), default=0),
        )


@dataclass(frozen=True)
class VarlenKernel:
    """A varlen attention kernel behind one signature:
    `fn(q [T_q, H, D], k [T_k, H_kv, D], v [T_k, H_kv, D], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    scale, dropout) -> [T_q, H, D]`, causal bottom-right within each segment, `H % H_kv == 0`."""

    name: str
    fn: Callable
    cuda: bool = False  # a fused CUDA kernel (not one of the PyTorch paths)


def varlen_attention(query, key, value, layout: VarlenLayout, kernel: VarlenKernel, scale=None, dropout=0.0):
    """Attention over a shared-prompt row in one kernel call.

    Args:
        query: `[T, H, D]`, the row's queries in row order; key, value: `[T, H_kv, D]`.
        layout: the row's `VarlenLayout` (tensors on the query's device).
        kernel: the kernel (`select_kernel`).
        scale: the softmax scale; None means `D ** -0.5`.

    Returns:
        `[T, H, D]`, in row order.
    """
    scale = query.size(-1) ** -0.5 if scale is None else scale
    # Each segment's keys: its prompt prefix's, then its own. The backward of index_select adds the gradients of a
    # prompt key over every completion that reads it
    k = key.index_select(0, layout.kv_index)
    v = value.index_select(0, layout.kv_index)
    return kernel.fn(
        query.contiguous(), k, v, layout.cu_seqlens_q, layout.cu_seqlens_k,
        int(layout.max_seqlen_q), int(layout.max_seqlen_k), float(scale), float(dropout),
    )


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[L, H_kv, D]` -> `[L, heads, D]` (or `[S, H_kv, L, D]` -> `[S, heads, L, D]`: the heads are dim 1), query head
    h reading key/value head `h // (heads // H_kv)` (transformers' `repeat_kv`)."""
    n_rep = heads // x.size(1)
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


# ------------------------------------------------------------------------------------------------ PyTorch paths
def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None, dropout=0.0):
    """Per segment: SDPA with `causal_lower_right(Lq, Lk)` and repeated key/value heads. Exact and differentiable (the
    stand-in for the CUDA kernels in the tests); reads the boundaries on the host."""
    from torch.nn.attention.bias import causal_lower_right

    heads = q.size(1)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = []
    for s in range(len(bq) - 1):
        qs = q[bq[s] : bq[s + 1]].transpose(0, 1).unsqueeze(0)  # [1, H, Lq, D]
        ks = _repeat_kv(k[bk[s] : bk[s + 1]], heads).transpose(0, 1).unsqueeze(0)  # [1, H, Lk, D]
        vs = _repeat_kv(v[bk[s] : bk[s + 1]], heads).transpose(0, 1).unsqueeze(0)
        if qs.size(2) > ks.size(2):
            raise ValueError(f"segment {s} has {qs.size(2)} queries but only {ks.size(2)} keys")
        mask = causal_lower_right(qs.size(2), ks.size(2))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout, scale=scale)
        out.append(o[0].transpose(0, 1))
    return torch.cat(out)


def padded_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None, dropout=0.0):
    """The segments padded into two batches, one SDPA call each: the segments with as many keys as queries (prompt
    prefixes) with `is_causal=True` and no mask (padding comes last, so no real query sees it), the others
    (completions after their prompt) with a boolean bottom-right causal mask and the key/value heads repeated
    (masked SDPA with `enable_gqa=True` has no fused CUDA kernel and falls back to the float32 "math" kernel). The
    old per-segment-kind attention of this layout, fed from the varlen boundaries; reads them on the host."""
    heads, dim = q.size(1), q.size(2)
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
        if square:
            out = F.scaled_dot_product_attention(
                qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=ks.size(1) != heads
            )
        else:
            ks, vs = _repeat_kv(ks, heads), _repeat_kv(vs, heads)
            # Query j sees keys 0 .. n_k - n_q + j (bottom-right); padded queries see key 0 only (no NaN rows)
            mask = k_real[:, None, :] & (jk[None, None, :] <= (n_k - n_q)[:, :, None] + jq[None, :, None])
            mask |= ~q_real[:, :, None] & (jk == 0)[None, None, :]
            out = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask[:, None].to(q.device), dropout_p=dropout, scale=scale
            )
        real = q_real.flatten().nonzero().squeeze(1).to(q.device)
        outputs.append(out.transpose(1, 2).reshape(-1, heads, dim).index_select(0, real))
        rows.append(q_rows.flatten().index_select(0, real))
    # Both groups' real queries, back in row order
    return torch.cat(outputs).index_select(0, torch.cat(rows).argsort())


# ------------------------------------------------------------------------------------------------ CUDA kernels
def flash_attn_kernel(fn: Callable, name: str) -> VarlenKernel:
    """A flash-attention `flash_attn_varlen_func` (the `flash_attn` package, FA3's `flash_attn_interface`, FA4's
    `flash_attn.cute`, or a hub kernel): GQA native, causal bottom-right (flash-attn >= 2.1), keyword arguments read
    from its signature."""
    params = inspect.signature(fn).parameters
    needed = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal")
    missing = [p for p in needed if p not in params]
    if missing:
        raise TypeError(f"{name} has no argument(s) {missing}: not a flash-attention varlen function")
    has_dropout = "dropout_p" in params

    def call(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout=0.0):
        kwargs = {}
        if has_dropout:
            kwargs["dropout_p"] = dropout
        elif dropout:
            raise ValueError(f"{name} has no attention dropout: set the model's attention_dropout to 0")
        out = fn(
            q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
            softmax_scale=scale, causal=True, **kwargs,
        )
        return out[0] if isinstance(out, tuple) else out  # FA3/FA4 versions that also return the log-sum-exp

    return VarlenKernel(name, call, cuda=True)


def torch_varlen_kernel(fn: Callable, name: str = "torch.nn.attention.varlen.varlen_attn") -> VarlenKernel:
    """`torch.nn.attention.varlen.varlen_attn`, in each signature it has had: causal as `is_causal=True` (torch 2.9) or
    `window_size=(-1, 0)` (later); `scale` where it takes one (else the queries are pre-scaled); `enable_gqa` where it
    takes one (else the key/value heads are repeated). It has no dropout."""
    params = inspect.signature(fn).parameters
    if "is_causal" in params:
        causal = {"is_causal": True}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    else:
        raise TypeError(f"{name}{inspect.signature(fn)} takes neither is_causal nor window_size: causal unsupported")
    has_scale, has_gqa = "scale" in params, "enable_gqa" in params

    def call(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout=0.0):
        if dropout:
            raise ValueError(f"{name} has no attention dropout: set the model's attention_dropout to 0")
        kwargs = dict(causal)
        if has_scale:
            kwargs["scale"] = scale
        elif not math.isclose(scale, q.size(-1) ** -0.5, rel_tol=1e-6):
            q = q * (scale * math.sqrt(q.size(-1)))  # the kernel's fixed 1/sqrt(D), turned into `scale`
        if k.size(1) != q.size(1):
            if has_gqa:
                kwargs["enable_gqa"] = True
            else:
                k, v = _repeat_kv(k, q.size(1)), _repeat_kv(v, q.size(1))
        out = fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return VarlenKernel(name, call, cuda=True)


_PYTORCH_PATHS = {
    "reference": VarlenKernel("reference_varlen (per-segment SDPA, causal_lower_right)", reference_varlen),
    "padded": VarlenKernel("padded_varlen (causal SDPA on the prompts, masked SDPA on the completions)", padded_varlen),
}


def _flash_candidates(implementation: str):
    """(name, loader) of the flash-attention varlen functions to try, the model's own implementation first."""
    from transformers.utils import is_flash_attn_2_available

    if implementation in _FLASH_IMPLEMENTATIONS or "/" in implementation:  # transformers' flash or a hub kernel

        def own():
            from transformers.modeling_flash_attention_utils import lazy_import_flash_attention

            return lazy_import_flash_attention(implementation)[0][1]

        yield f"flash_attn_varlen_func ({implementation})", own
    if is_flash_attn_2_available():

        def package():
            from flash_attn import flash_attn_varlen_func

            return flash_attn_varlen_func

        yield "flash_attn.flash_attn_varlen_func", package


def cuda_varlen_kernel(
    implementation: str, device: torch.device | None = None, kinds: tuple[str, ...] = ("flash_attn", "torch")
) -> tuple[VarlenKernel | None, str]:
    """The fused CUDA varlen kernel for a model of this attention implementation, in the module's order (of `kinds`:
    `flash_attn` and/or `torch`), or None and why there is none."""
    if not torch.cuda.is_available():
        return None, "CUDA is not available"
    reasons = []
    for name, load in _flash_candidates(implementation) if "flash_attn" in kinds else ():
        try:
            from transformers.modeling_flash_attention_utils import flash_attn_supports_top_left_mask

            if flash_attn_supports_top_left_mask():
                raise RuntimeError("this flash-attention aligns causal masks top-left (flash-attn < 2.1)")
            fn = load()
            if fn is None:
                raise RuntimeError("it has no varlen function")
            return flash_attn_kernel(fn, name), ""
        except Exception as e:  # noqa: BLE001 - any failure to load means: try the next kernel
            reasons.append(f"{name}: {e}")
    if "torch" not in kinds:
        return None, "; ".join(reasons)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        reasons.append("torch.nn.attention.varlen: not in this torch (2.9+)")
    else:
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            reasons.append("torch.nn.attention.varlen.varlen_attn: needs compute capability 8.0+")
        else:
            try:
                return torch_varlen_kernel(varlen_attn), ""
            except TypeError as e:
                reasons.append(str(e))
    return None, "; ".join(reasons)


_selected: dict[tuple, VarlenKernel] = {}


def selected_kernels() -> list[str]:
    """The names of the kernels `select_kernel` has chosen in this process, since `reset_kernel_choices`."""
    return sorted({kernel.name for kernel in _selected.values()})


def reset_kernel_choices() -> None:
    """Forget the kernels chosen so far: the next call of `select_kernel` chooses (and logs) again."""
    _selected.clear()


def select_kernel(device: torch.device, dtype: torch.dtype, implementation: str = "sdpa") -> VarlenKernel:
    """The varlen kernel for queries on `device` in `dtype`, for a model loaded with `implementation` (see the module
    docstring for the order). Chosen once per (device type, dtype, implementation, override) and logged then."""
    forced = os.environ.get(KERNEL_ENV) or None
    key = (device.type, dtype, implementation, forced)
    if key in _selected:
        return _selected[key]
    half = dtype in (torch.float16, torch.bfloat16)
    reason = ""
    if forced is not None:
        if forced in _PYTORCH_PATHS:
            kernel = _PYTORCH_PATHS[forced]
        elif forced in ("flash_attn", "torch"):
            if device.type != "cuda" or not half:
                raise ValueError(f"{KERNEL_ENV}={forced} needs CUDA and float16/bfloat16, got {device.type} {dtype}")
            kernel, reason = cuda_varlen_kernel(implementation, device, kinds=(forced,))
            if kernel is None:
                raise ValueError(f"{KERNEL_ENV}={forced}: that kernel is not available here ({reason})")
        else:
            raise ValueError(f"{KERNEL_ENV}={forced!r}: expected one of flash_attn, torch, reference, padded")
    elif device.type == "cuda" and half:
        kernel, reason = cuda_varlen_kernel(implementation, device)
        kernel = kernel or _PYTORCH_PATHS["padded"]
    elif device.type == "cuda":
        kernel, reason = _PYTORCH_PATHS["padded"], f"the fused kernels need float16/bfloat16, the queries are {dtype}"
    else:
        kernel = _PYTORCH_PATHS[CPU_KERNEL]
    _selected[key] = kernel
    logger.info(
        "Shared-prompt attention on %s (%s): %s, one call per layer%s.",
        device.type, str(dtype).replace("torch.", ""), kernel.name, f" (no fused kernel: {reason})" if reason else "",
    )
    return kernel
