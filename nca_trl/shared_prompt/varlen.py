"""Variable-length attention for the shared-prompt layout: one kernel call per layer, and the kernels that take it.

The shared-prompt row (`nca_trl.shared_prompt.packing`) is a sequence of S *segments*, contiguous in the row: a prompt's
prefix (its tokens but the last), then each of its completions (the last prompt token and the completion). A prefix
attends causally to itself; a completion attends to its whole prompt prefix and causally to itself. One varlen call does
all of it:

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
3. anywhere else: a PyTorch path (`nca_trl.shared_prompt.torch_paths`) that runs the same gather and boundaries:
   `reference_varlen` (per segment, SDPA with `torch.nn.attention.bias.causal_lower_right`, key/value heads repeated)
   or `padded_varlen` (the prompt prefixes padded into one causal SDPA call, the completions into one masked SDPA call
   with repeated key/value heads).
   `CPU_KERNEL` is the CPU default, the faster of the two in `results/benchmark_layouts_cpu.json`; CUDA without a
   varlen kernel (or in float32) uses `padded_varlen`. `NCA_TRL_VARLEN_KERNEL` (`flash_attn`, `torch`, `reference`
   or `padded`) forces one of them.

Attention variants (`VarlenKernel.features`), each applied exactly as the model's own attention applies it:

- `sliding_window` w: a query sees its last w keys, itself included (transformers' `kv > q - w`; flash-attention's
  `window_size=(w - 1, 0)`, bottom-right as the causal mask): every path but torch 2.9's `varlen_attn`;
- `softcap` c: scores become `c * tanh(scores / c)` before the mask (Gemma 2): `flash_attn` kernels that take
  `softcap`, and `reference_varlen`;
- `sinks` (GPT-OSS's per-head `s_aux` logits): one more logit per head in every softmax, dropped afterwards:
  `reference_varlen` only;
- `wide_heads`: heads of a width no fused kernel takes (`fused_head_width`): wider than `FUSED_MAX_HEAD_DIM` (256)
  dimensions (Gemma 4's 512-wide global layers), not a multiple of 8, or values wider than the queries: the PyTorch
  paths only (not a keyword of the attention call: read from the queries' and values' widths);
- `dropout` p > 0 (attention dropout, which a model passes in training only, e.g. GPT-BigCode's `attn_pdrop`, which
  TRL's `disable_dropout` does not reach): `flash_attn` kernels that take `dropout_p` (FlashAttention 2) and the
  PyTorch paths; not torch's `varlen_attn`.

A kernel is only chosen for what it implements (`select_kernel(..., needs=...)`); the trainer decides the layout at
construction from the model (`nca_trl.shared_prompt.families.shared_prompt_support`).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .torch_paths import padded_varlen, reference_varlen, repeat_kv

logger = logging.getLogger("nca_trl")

__all__ = [
    "CPU_KERNEL", "FEATURES", "FUSED_HEAD_DIM_MULTIPLE", "FUSED_MAX_HEAD_DIM", "KERNEL_ENV", "VarlenKernel",
    "VarlenLayout", "binding_window", "cuda_varlen_kernel", "flash_attn_kernel", "forced_kernel_problem",
    "fused_head_width", "padded_varlen", "reference_varlen", "reset_kernel_choices", "select_kernel",
    "selected_kernels", "torch_varlen_kernel", "varlen_attention", "wide_heads",
]

KERNEL_ENV = "NCA_TRL_VARLEN_KERNEL"
# The CPU default, the faster PyTorch path in results/benchmark_layouts_cpu.json (docs/trainers.md lists the order)
CPU_KERNEL = "reference"
_FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
# The attention variants a kernel may implement (module docstring)
FEATURES = ("sliding_window", "softcap", "sinks", "wide_heads", "dropout")
# The head widths the fused kernels take: at most 256 dimensions (flash-attention 2/3/4, torch's varlen_attn), a
# multiple of 8 (FlashAttention 3/4's kernels check it, as FlashAttention 2's C++ does, whose Python wrapper pads);
# other widths are the `wide_heads` variant, which only the PyTorch paths implement
FUSED_MAX_HEAD_DIM = 256
FUSED_HEAD_DIM_MULTIPLE = 8


@dataclass
class VarlenLayout:
    """The integers one varlen call needs, built on the CPU by the collator (`nca_trl.shared_prompt.packing`).

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

    def to(self, device, non_blocking: bool = False) -> VarlenLayout:
        """The layout with its tensors on `device`: what accelerate's hooks call to move a layer's arguments (a model
        split over several GPUs by `device_map`), and `varlen_attention` where the queries are elsewhere."""
        return replace(self, **{key: getattr(self, key).to(device, non_blocking=non_blocking)
                                for key in ("cu_seqlens_q", "cu_seqlens_k", "kv_index")})

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
    scale, dropout, window=None, softcap=None, sinks=None) -> [T_q, H, D]`, causal bottom-right within each segment,
    `H % H_kv == 0`; `features` names the variants of `FEATURES` it implements (the others must be None)."""

    name: str
    fn: Callable
    cuda: bool = False  # a fused CUDA kernel (not one of the PyTorch paths)
    features: frozenset = frozenset()

    def lacks(self, needs) -> list[str]:
        """The variants of `needs` this kernel does not implement, in `FEATURES` order."""
        return [f for f in FEATURES if f in needs and f not in self.features]


def fused_head_width(query_dim: int, value_dim: int | None = None) -> bool:
    """Whether the fused kernels take heads `query_dim` wide (queries and keys) with values `value_dim` wide (None: as
    wide as the queries): at most `FUSED_MAX_HEAD_DIM`, a multiple of `FUSED_HEAD_DIM_MULTIPLE`, values no wider than
    the queries (narrower values, MLA's, are zero-padded to the queries' width)."""
    value_dim = query_dim if value_dim is None else value_dim
    return query_dim <= FUSED_MAX_HEAD_DIM and query_dim % FUSED_HEAD_DIM_MULTIPLE == 0 and value_dim <= query_dim


def wide_heads(query: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether an attention call's heads (the last dimension of its queries and values) are of a width the fused
    kernels do not take (`fused_head_width`): the `wide_heads` variant."""
    return not fused_head_width(query.size(-1), value.size(-1))


def _named(variants: list[str]) -> str:
    """Variants of `FEATURES` for a message (`wide_heads` says what it is)."""
    wide = (f"wide_heads (heads wider than {FUSED_MAX_HEAD_DIM} dimensions, not a multiple of "
            f"{FUSED_HEAD_DIM_MULTIPLE}, or values wider than queries)")
    return ", ".join(wide if v == "wide_heads" else v for v in variants)


def binding_window(window: int | None, layout: VarlenLayout) -> int | None:
    """`window`, or None where it holds every segment's keys (a window that never binds is no window)."""
    return None if window is None or window >= int(layout.max_seqlen_k) else window


def varlen_attention(
    query, key, value, layout: VarlenLayout, kernel: VarlenKernel, scale=None, dropout=0.0, window=None, softcap=None,
    sinks=None,
):
    """Attention over a shared-prompt row in one kernel call.

    Args:
        query: `[T, H, D]`, the row's queries in row order; key: `[T, H_kv, D]`; value: `[T, H_kv, D_v]` (MLA: D_v < D).
        layout: the row's `VarlenLayout` (tensors on the query's device).
        kernel: the kernel (`select_kernel`), implementing every variant given.
        scale: the softmax scale; None means `D ** -0.5`.
        window: a sliding window of `window` keys (`binding_window`); softcap: softcapping; sinks: `[H]` sink logits.

    Returns:
        `[T, H, D_v]`, in row order.
    """
    window = binding_window(window, layout)
    variants = {n: v for n, v in (("window", window), ("softcap", softcap), ("sinks", sinks)) if v is not None}
    other = {n for n, used in (("wide_heads", wide_heads(query, value)), ("dropout", dropout > 0)) if used}
    lacking = kernel.lacks({"sliding_window" if n == "window" else n for n in variants} | other)
    if lacking:
        raise ValueError(f"the varlen kernel {kernel.name} does not implement {_named(lacking)}")
    scale = query.size(-1) ** -0.5 if scale is None else scale
    if layout.kv_index.device != query.device:  # a layer on another GPU than the one the row was put on
        layout = layout.to(query.device)
    # Each segment's keys: its prompt prefix's, then its own. The backward of index_select adds the gradients of a
    # prompt key over every completion that reads it
    k = key.index_select(0, layout.kv_index)
    v = value.index_select(0, layout.kv_index)
    v_dim = v.size(-1)
    if kernel.cuda and v_dim != query.size(-1):  # fused kernels take one head dim (MLA's values are narrower): pad
        v = F.pad(v, [0, query.size(-1) - v_dim])  # with zero columns, cropped from the output
    return kernel.fn(
        query.contiguous(), k, v, layout.cu_seqlens_q, layout.cu_seqlens_k,
        int(layout.max_seqlen_q), int(layout.max_seqlen_k), float(scale), float(dropout), **variants,
    )[..., :v_dim]


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
    features = frozenset(f for f, arg in (("sliding_window", "window_size"), ("softcap", "softcap"),
                                          ("dropout", "dropout_p")) if arg in params)

    def call(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout=0.0, window=None, softcap=None):
        kwargs = {"dropout_p": dropout} if "dropout" in features else {}  # `varlen_attention` checked the features
        if window is not None:
            kwargs["window_size"] = (window - 1, 0)  # the last `window` keys, the query's own included
        if softcap is not None:
            kwargs["softcap"] = softcap
        out = fn(
            q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
            softmax_scale=scale, causal=True, **kwargs,
        )
        return out[0] if isinstance(out, tuple) else out  # FA3/FA4 versions that also return the log-sum-exp

    return VarlenKernel(name, call, cuda=True, features=features)


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
    has_window = "window_size" in params

    def call(q, k, v, cu_q, cu_k, max_q, max_k, scale, dropout=0.0, window=None):  # dropout: not a feature
        # A sliding window: the last `window` keys, the query's own included (flash-attention's window_size)
        kwargs = dict(causal) if window is None else {"window_size": (window - 1, 0)}
        if has_scale:
            kwargs["scale"] = scale
        elif not math.isclose(scale, q.size(-1) ** -0.5, rel_tol=1e-6):
            q = q * (scale * math.sqrt(q.size(-1)))  # the kernel's fixed 1/sqrt(D), turned into `scale`
        if k.size(1) != q.size(1):
            if has_gqa:
                kwargs["enable_gqa"] = True
            else:
                k, v = repeat_kv(k, q.size(1)), repeat_kv(v, q.size(1))
        out = fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return VarlenKernel(name, call, cuda=True, features=frozenset({"sliding_window"} if has_window else ()))


_PYTORCH_PATHS = {
    "reference": VarlenKernel(
        "reference_varlen (per-segment SDPA, causal_lower_right)", reference_varlen, features=frozenset(FEATURES)
    ),
    "padded": VarlenKernel(
        "padded_varlen (causal SDPA on the prompts, masked SDPA on the completions)", padded_varlen,
        features=frozenset({"sliding_window", "wide_heads", "dropout"}),
    ),
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
    implementation: str,
    device: torch.device | None = None,
    kinds: tuple[str, ...] = ("flash_attn", "torch"),
    needs: frozenset = frozenset(),
) -> tuple[VarlenKernel | None, str]:
    """The fused CUDA varlen kernel for a model of this attention implementation that implements every variant in
    `needs` (`FEATURES`), in the module's order (of `kinds`: `flash_attn` and/or `torch`), or None and why there is
    none."""
    if not torch.cuda.is_available():
        return None, "CUDA is not available"
    if torch.version.hip is not None:  # an allow-list: the kernels were compared with the plain layout on NVIDIA GPUs
        return None, "ROCm: the fused varlen kernels are checked against the plain layout on NVIDIA GPUs only"
    reasons = []

    def usable(kernel: VarlenKernel):
        lacking = kernel.lacks(needs)
        if lacking:
            reasons.append(f"{kernel.name}: does not implement {_named(lacking)}")
            return None
        return kernel

    for name, load in _flash_candidates(implementation) if "flash_attn" in kinds else ():
        try:
            from transformers.modeling_flash_attention_utils import flash_attn_supports_top_left_mask

            if flash_attn_supports_top_left_mask():
                raise RuntimeError("this flash-attention aligns causal masks top-left (flash-attn < 2.1)")
            fn = load()
            if fn is None:
                raise RuntimeError("it has no varlen function")
            kernel = flash_attn_kernel(fn, name)
        except Exception as e:  # noqa: BLE001 - any failure to load means: try the next kernel
            reasons.append(f"{name}: {e}")
            continue
        if usable(kernel):
            return kernel, ""
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
                kernel = torch_varlen_kernel(varlen_attn)
            except TypeError as e:
                reasons.append(str(e))
            else:
                if usable(kernel):
                    return kernel, ""
    return None, "; ".join(reasons)


_selected: dict[tuple, VarlenKernel] = {}


def selected_kernels() -> list[str]:
    """The names of the kernels `select_kernel` has chosen in this process, since `reset_kernel_choices`."""
    return sorted({kernel.name for kernel in _selected.values()})


def reset_kernel_choices() -> None:
    """Forget the kernels chosen so far: the next call of `select_kernel` chooses (and logs) again."""
    _selected.clear()


def forced_kernel_problem(needs: frozenset, device_type: str, half: bool) -> str:
    """Why the kernel `NCA_TRL_VARLEN_KERNEL` forces could not run a model with the attention variants `needs` on
    `device_type` (`half`: float16/bfloat16), as `select_kernel` would find at the first forward; "" if it can (or
    nothing is forced). Known without loading a fused kernel: none implements sinks or wide heads, torch's none
    softcapping nor dropout."""
    forced = os.environ.get(KERNEL_ENV) or None
    if forced is None:
        return ""
    if forced in _PYTORCH_PATHS:
        name, lacking = _PYTORCH_PATHS[forced].name, _PYTORCH_PATHS[forced].lacks(needs)
    elif forced in ("flash_attn", "torch"):
        if device_type != "cuda" or not half:
            return f"{KERNEL_ENV}={forced} needs CUDA and float16/bfloat16, and training runs on {device_type}" + (
                "" if half else " in float32")
        unknown = ("sinks", "wide_heads") if forced == "flash_attn" else ("softcap", "sinks", "wide_heads", "dropout")
        name, lacking = f"the {forced} kernel", [f for f in FEATURES if f in needs and f in unknown]
    else:
        return f"{KERNEL_ENV}={forced!r}: expected one of flash_attn, torch, reference, padded"
    return (f"{KERNEL_ENV}={forced}: {name} does not implement {_named(lacking)}, which this model's attention uses: "
            "unset it (the reference path implements every variant)") if lacking else ""


def _pytorch_path(name: str, needs: frozenset) -> VarlenKernel:
    """The PyTorch path `name`, or `reference_varlen` (which implements every variant) where it lacks one of `needs`."""
    kernel = _PYTORCH_PATHS[name]
    return _PYTORCH_PATHS["reference"] if kernel.lacks(needs) else kernel


def select_kernel(
    device: torch.device, dtype: torch.dtype, implementation: str = "sdpa", needs: frozenset = frozenset()
) -> VarlenKernel:
    """The varlen kernel for queries on `device` in `dtype`, for a model loaded with `implementation`, implementing
    every attention variant in `needs` (see the module docstring for the order). Chosen once per (device type, dtype,
    implementation, needs, override) and logged then."""
    forced = os.environ.get(KERNEL_ENV) or None
    needs = frozenset(needs)
    key = (device.type, dtype, implementation, needs, forced)
    if key in _selected:
        return _selected[key]
    half = dtype in (torch.float16, torch.bfloat16)
    reason = ""
    if forced is not None:
        problem = forced_kernel_problem(needs, device.type, half)  # what the trainer checked at construction
        if problem:
            raise ValueError(problem)
        if forced in _PYTORCH_PATHS:
            kernel = _PYTORCH_PATHS[forced]
        else:  # a fused kernel, on CUDA in float16/bfloat16; None where it lacks a variant of `needs`
            kernel, reason = cuda_varlen_kernel(implementation, device, kinds=(forced,), needs=needs)
            if kernel is None:
                raise ValueError(f"{KERNEL_ENV}={forced}: that kernel is not available here ({reason})")
    elif device.type == "cuda" and half:
        kernel, reason = cuda_varlen_kernel(implementation, device, needs=needs)
        kernel = kernel or _pytorch_path("padded", needs)
    elif device.type == "cuda":
        kernel = _pytorch_path("padded", needs)
        reason = f"the fused kernels need float16/bfloat16, the queries are {dtype}"
    else:
        kernel = _pytorch_path(CPU_KERNEL, needs)
    _selected[key] = kernel
    logger.info(
        "Shared-prompt attention on %s (%s%s): %s, one call per layer%s.",
        device.type, str(dtype).replace("torch.", ""), "".join(f", {n}" for n in FEATURES if n in needs), kernel.name,
        f" (no fused kernel: {reason})" if reason else "",
    )
    return kernel
