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
attention is one variable-length call per layer (`nca_trl.shared_prompt.varlen`): each *segment* (a prompt prefix, or
one completion) is one sequence of the call, its queries in place in the row and its keys gathered as `[its prompt's
prefix; its own tokens]`, with causal masking aligned bottom-right. The function doing it is registered in transformers'
`AttentionInterface` under `nca_shared_prompt|<implementation>` and hands every other call (plain batches, generation)
to the model's own implementation. Which models may take the layout is `nca_trl.shared_prompt.families`' rule
(`enable_shared_prompt` applies it); `shared_prompt_forward` checks every forward again.

On a GPU the layout pays where a fused varlen kernel runs it (flash-attn, or torch's `varlen_attn`), in bf16/fp16:
there `shared_prompt=None` takes it for every batch (the trainer's `_setup_layout`; the measurements in
`results/gpu_layouts.json`), and without such a kernel the plain layout.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import sys

import torch

from .families import ROUTED_PREFIX as _PREFIX
from .families import SharedPromptSupport, attention_modules, attention_variants, shared_prompt_support
from .families import declares_sliding_window, original_attention_implementation, training_dropout
from .varlen import VarlenLayout, binding_window, cuda_varlen_kernel, forced_kernel_problem, select_kernel
from .varlen import varlen_attention, wide_heads

logger = logging.getLogger("nca_trl")

__all__ = [
    "LAYOUT_KEYS", "SharedPromptLayoutMixin", "build_shared_prompt_batch", "enable_shared_prompt",
    "is_shared_prompt_batch", "is_shared_prompt_enabled", "shared_prompt_attention", "shared_prompt_forward",
]

# Batch keys of the shared-prompt layout that the attention reads (passed to the model as `nca_layout`)
LAYOUT_KEYS = VarlenLayout.KEYS


@dataclasses.dataclass
class _ForwardCheck:
    """What the attention got while a shared-prompt row was forwarded (`shared_prompt_forward`): the attention
    variants (`sliding_window`, `softcap`, `sinks`, `wide_heads`) its calls were given, the attention modules (by
    `id`) that ran (`_note_ran`, a forward pre-hook) and those that ran with the layout."""

    variants: set[str] = dataclasses.field(default_factory=set)
    ran: dict[int, str] = dataclasses.field(default_factory=dict)  # id -> class name
    modules: set[int] = dataclasses.field(default_factory=set)


# Set while a shared-prompt row is forwarded; an attention call that gets no layout then raises
_FORWARD_CHECK: contextvars.ContextVar[_ForwardCheck | None] = contextvars.ContextVar("nca_forward", default=None)


def is_shared_prompt_batch(batch) -> bool:
    """Whether a collated batch is in the shared-prompt layout (else the plain padded one)."""
    return "cu_seqlens_q" in batch


def build_shared_prompt_batch(examples: list[dict], max_length: int | None) -> dict[str, torch.Tensor | int]:
    """Lay out a batch of tokenized rated examples as one flat row (see the module docstring).

    Args:
        examples: dicts with `prompt_ids` (at least one token) and `completion_ids` (K_b lists).
        max_length: each `prompt + completion` is cut to `max_length` tokens from its start, as in the plain layout.

    Returns:
        - `input_ids`, `position_ids`, `shift_labels` (`-100` where nothing is scored): `[1, T]`;
        - `token_sequence`: `[T]`, the sequence index (slot-major, as in the plain layout) a scored token belongs to,
          -1 elsewhere; `token_column` `[T]` and `plain_width` (a Python int): the column of the token's log-prob in the plain
          layout's `[N, L - 1]` per-token tensor, and `L - 1`, so that sequence sums can be taken in the same order;
        - the attention segments, in row order (each prompt's prefix if it has one, then its completions), as one
          varlen call takes them (`varlen.VarlenLayout`): `cu_seqlens_q` `[S + 1]` and `cu_seqlens_k`
          `[S + 1]` (int32), `kv_index` `[T_k]` (int64, the row position of each segment's keys: its prompt's prefix,
          then its own tokens), `max_seqlen_q` and `max_seqlen_k` (Python ints).
    """
    ids, pos, labels, seq, column = [], [], [], [], []
    segments = []  # (start in the row, number of queries, key positions), in row order
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
            raise ValueError(
                f"example {b} of the batch has an empty prompt: the shared-prompt layout needs at least one prompt "
                "token (e.g. BOS) per example. Add a BOS token to the prompts, or set shared_prompt=False."
            )
        start = len(ids)
        prefix = list(range(start, start + p - 1))
        ids += prompt[:-1]
        pos += list(range(p - 1))
        labels += [-100] * (p - 1)
        seq += [-1] * (p - 1)
        column += [-1] * (p - 1)
        if prefix:
            segments.append((start, len(prefix), prefix))
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
            segments.append((first, len(own), prefix + list(range(first, first + len(own)))))

    layout = VarlenLayout.from_segments(segments)
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([pos]),
        "shift_labels": torch.tensor([labels]),
        "token_sequence": torch.tensor(seq),
        "token_column": torch.tensor(column),
        "plain_width": plain_width,  # an int, like the maxima: a batch holds no 0-dimensional tensor
        **{key: getattr(layout, key) for key in LAYOUT_KEYS},
    }


def shared_prompt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over the segments of a shared-prompt row in one varlen call (`nca_trl.shared_prompt.varlen`); any other
    call goes to the model's own implementation.

    `query` is `[1, H, T, D]`, `key`/`value` `[1, H_kv, T, D]`; returns `[1, T, H, D]` like transformers' kernels.
    The row's `VarlenLayout` comes as the `nca_layout` keyword; `attention_mask` is not read. The attention variants
    the model passes (`sliding_window`, `softcap`, GPT-OSS's sinks `s_aux`) are applied as its own attention applies
    them; `shared_prompt_support` admits only models whose variants are among these.
    """
    layout = kwargs.pop("nca_layout", None)
    original = module.config._attn_implementation[len(_PREFIX) :]
    check = _FORWARD_CHECK.get()
    if layout is None and check is not None:
        raise RuntimeError(
            f"{type(module).__name__} got no shared-prompt layout while a shared-prompt row was forwarded: its model "
            "does not pass keyword arguments on to its attention, so each completion would attend to the others. "
            "Set shared_prompt=False to train this model with the plain padded layout."
        )
    if layout is None:
        # A plain batch, run as loaded: with the config naming the original too (transformers' flash wrapper loads its
        # kernel by that name: the routed one raised, or for a hub kernel replaced this function)
        config, routed = module.config, module.config._attn_implementation_internal
        config._attn_implementation_internal = original
        try:
            return _original_attention(module, original)(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        finally:
            config._attn_implementation_internal = routed
    if query.size(0) != 1:
        raise ValueError(f"a shared-prompt batch is one row, got a batch of {query.size(0)} rows")
    window, softcap, sinks = kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux")
    if window is not None and original in ("eager", "sdpa") and not declares_sliding_window(module.config):
        window = None  # not in the plain layout's mask either: a window the config does not declare (OLMoE passes one)
    given = {n for n, v in (("sliding_window", window), ("softcap", softcap), ("sinks", sinks)) if v is not None}
    if wide_heads(query, value):
        given.add("wide_heads")  # the fused kernels take none: `select_kernel` takes a PyTorch path for this call
    if dropout:
        given.add("dropout")  # training only: a kernel that applies it, as the plain layout's attention does
    if check is not None:  # what `shared_prompt_forward` compares with the model's variants and attention modules
        check.variants.update(given)
        check.modules.add(id(module))
    if original == "sdpa" and softcap is not None:
        raise ValueError("the model passes `softcap`, which its own sdpa attention refuses: load it with eager")
    if torch.is_autocast_enabled(query.device.type):
        # Under autocast the rotary embedding leaves float32 queries and keys beside bfloat16 values: take the autocast
        # dtype, as SDPA's autocast rule (the plain layout) and transformers' flash path (`fa_peft_integration_check`)
        # do, so that the kernels get one dtype and the fused ones can run
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    window = binding_window(window, layout)  # None where the window holds every segment: not needed then
    needs = frozenset(given if window is not None else given - {"sliding_window"})
    kernel = select_kernel(query.device, query.dtype, original, needs)
    out = varlen_attention(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), layout, kernel, scaling, dropout,
        window=window, softcap=softcap, sinks=sinks,
    )  # [T, H, D], row order
    return out.unsqueeze(0), None


@contextlib.contextmanager
def shared_prompt_forward(model, longest: int | None = None):
    """Wrap the forward pass of a shared-prompt row through `model`, and check what its attention received: inside,
    an attention call without the row's layout (`nca_layout`, lost by a model that does not pass keyword arguments
    down to its attention) raises instead of attending over the whole row; after it, an attention module that ran
    (`enable_shared_prompt` hooked each one) but not with the layout (one that computes its attention without
    transformers' `AttentionInterface`, or with a config of its own), or a sliding window or sinks
    (`attention_variants`) that no attention call was given (a window applied only by the model's mask, which this
    layout does not build), raises instead of returning log-probs without it. Modules that do not run (OPT's
    `layerdrop`, cross-attention without encoder states) are not asked for, nor a window of at least `longest` keys
    (the row's `max_seqlen_k`, where given), which masks nothing. Backward recomputation (gradient checkpointing)
    reuses the forward's keyword arguments."""
    attention = _hook_attention(model)  # also an attention module swapped in since `enable_shared_prompt`
    check = _ForwardCheck()
    token = _FORWARD_CHECK.set(check)
    try:
        yield
    finally:
        _FORWARD_CHECK.reset(token)
    skipped = next((name for i, name in check.ran.items() if i not in check.modules), None)
    if skipped is not None:
        raise RuntimeError(
            f"{skipped} ran without the shared-prompt layout while a shared-prompt row was forwarded "
            f"through {type(model).__name__}: it computed its attention over the whole row (without transformers' "
            "AttentionInterface, or with a config of its own, as a copy made by PEFT's modules_to_save has), so each "
            "completion would attend to the others. Set shared_prompt=False to train this model with the plain padded "
            "layout."
        )
    # Softcapping reaches the kernels only as a call's keyword, plain layout included: one not given is applied by
    # neither layout (Gemma 3's attention keeps `attn_logit_softcapping` but passes none). A window can live in a mask;
    # wide heads are the queries' width, nothing a model could apply elsewhere; dropout is a call's keyword too, given
    # in training only.
    missing = sorted(attention_variants(model, attention, longest) - {"softcap", "wide_heads", "dropout"}
                     - check.variants)
    if missing:
        raise RuntimeError(
            f"{type(model).__name__}'s attention uses {' and '.join(missing)} (its config or modules), but none of its "
            "attention calls was given it while a shared-prompt row was forwarded: the model applies it elsewhere (a "
            "window in its attention mask, which this layout does not build). Set shared_prompt=False to train it "
            "with the plain padded layout."
        )


def _original_attention(module, original: str):
    """The attention function the model was loaded with: transformers' registered kernels, or the eager function of
    the module's own modeling file (Gemma 2's applies softcapping, GPT-OSS's the sinks: Llama's would drop them)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if original != "eager":
        return ALL_ATTENTION_FUNCTIONS[original]
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if own is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as own
    return own


def _register(original: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = _PREFIX + original
    ALL_ATTENTION_FUNCTIONS.register(name, shared_prompt_attention)
    # Plain batches and generation build the original's mask; a shared-prompt batch passes a prepared [1, 1, 1, T]
    # mask, which transformers returns as is (no T x T mask is built for it)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def enable_shared_prompt(model, max_length: int | None = None) -> SharedPromptSupport:
    """Route `model`'s attention through `shared_prompt_attention` if `shared_prompt_support` admits it (idempotent);
    otherwise change nothing and return the reason. The attention still hands plain batches to the model's own
    implementation."""
    support = shared_prompt_support(model, max_length)
    if support.enabled:
        config = model.config.get_text_config()
        if not config._attn_implementation.startswith(_PREFIX):
            config._attn_implementation = _register(config._attn_implementation or "eager")
        _hook_attention(model)
    return support


def _hook_attention(model) -> list:
    """Give each attention module of `model` the pre-hook `_note_ran` (once): what `shared_prompt_forward` checks.
    Returns the modules (`attention_modules`)."""
    attention = attention_modules(model)
    for module in attention:
        if _note_ran not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_note_ran)
    return attention


def _note_ran(module, args):
    """Forward pre-hook of each attention module: note that it ran while a shared-prompt row was forwarded (module
    copies such as `nn.DataParallel`'s replicas share it, and note themselves)."""
    check = _FORWARD_CHECK.get()
    if check is not None:
        check.ran[id(module)] = type(module).__name__


def is_shared_prompt_enabled(model) -> bool:
    """Whether `model`'s attention was routed through `shared_prompt_attention` by `enable_shared_prompt`."""
    return (model.config.get_text_config()._attn_implementation or "").startswith(_PREFIX)


# ------------------------------------------------------------------------------------------------ the trainers' choice
class SharedPromptLayoutMixin:
    """The trainers' batches: their layout, decided once at construction (`_setup_layout`, called at the end of
    `__init__`: the collator's `shared_prompt` flag, and the models' attention routed through
    `shared_prompt_attention`), and how they travel between processes (`_no_batch_dispatch`). Needs the trainer's
    `args`, `accelerator`, `model`, `ref_model`, `data_collator`, `compute_metrics` and `_padding_free`."""

    def _setup_layout(self):
        """Switch the collator to the shared-prompt layout if the config asks for it and it is exact here; otherwise
        keep the plain layout and say why in one log line (automatic) or refuse (`shared_prompt=True`,
        `padding_free=True`). Decided once, at construction; idempotent.

        `shared_prompt=None` (automatic) takes the layout where `_layout_blocker` finds nothing against it: on a CPU,
        and on a CUDA GPU with a fused varlen kernel in float16 or bfloat16 (where it measured 2.7-3.0x the plain
        layout: results/gpu_layouts.json), for models that `shared_prompt_support` admits."""
        if getattr(self, "_layout_checked", False):
            return
        self._layout_checked = True
        collator = self.data_collator
        if getattr(collator, "shared_prompt", None) is None:  # not `DataCollatorForRatedCompletions`
            if self._padding_free:
                raise ValueError(
                    f"`padding_free=True` needs the trainer's own collator (`DataCollatorForRatedCompletions`), got "
                    f"{type(collator).__name__}."
                )
            return
        requested = getattr(self.args, "shared_prompt", None)  # None: automatic
        if requested is False:
            return
        automatic = requested is None and not self._padding_free
        reason, kernel_name = self._layout_blocker(automatic)
        if reason:
            if not automatic:
                setting, fix = (("`padding_free=True`", "Remove `padding_free`") if self._padding_free else
                                ("`shared_prompt=True`", "Set `shared_prompt=None` (automatic) or False"))
                raise ValueError(
                    f"{setting} requires the shared-prompt layout, which cannot run here, or not exactly: {reason}. "
                    f"{fix} to train with the plain padded layout."
                )
            logger.warning("Plain padded layout (shared_prompt=None, automatic): %s.", reason)
            return
        for model in (self.model, self.ref_model):
            if model is not None:
                enable_shared_prompt(self.accelerator.unwrap_model(model), collator.max_length)
        collator.shared_prompt = True
        if kernel_name is not None:
            logger.info("Shared-prompt layout (shared_prompt=None, automatic) on %s with %s. Set shared_prompt=False for "
                        "the plain padded layout.", self.accelerator.device.type, kernel_name)

    def _no_batch_dispatch(self) -> None:
        """accelerate's `dispatch_batches` (its default for an `IterableDataset`) has process 0 concatenate the batches
        of all processes and split every tensor along its first dimension: a rated batch has none that all tensors
        share (N sequences beside B prompts; one row in the shared-prompt layout). Each process reads its own share
        of the data instead (`IterableDatasetShard` for a stream), as with a map-style dataset; said once where the
        user asked for dispatching."""
        config = self.accelerator.dataloader_config
        if config.dispatch_batches:
            logger.warning(
                "accelerator_config.dispatch_batches=True: %s's batches (K completions per prompt) cannot be split "
                "by accelerate along one dimension, so each process reads the data and keeps its own share of the batches "
                "instead (dispatch_batches=False).", type(self).__name__,
            )
        config.dispatch_batches = False

    def _layout_blocker(self, automatic: bool) -> tuple[str, str | None]:
        """Why the shared-prompt layout cannot run, or would not be exact, here ("" if nothing), and for the
        automatic choice on an accelerator the fused kernel it would run with."""
        # The collator's own setting: one given by the user may differ from the config's
        truncation_mode = self.data_collator.truncation_mode
        if truncation_mode != "keep_start":
            return f"truncation_mode={truncation_mode!r} cuts each sequence's prompt differently", None
        if self.data_collator.pad_to_multiple_of is not None:
            return "pad_to_multiple_of asks for padded shapes", None
        if self.compute_metrics is not None:
            return "compute_metrics takes each sequence's padded logits, which only the plain layout builds", None
        if self.args.neftune_noise_alpha is not None:  # transformers' NEFTune: alpha / sqrt(length x hidden)
            return ("neftune_noise_alpha scales its embedding noise by the row's length, which the shared-prompt row "
                    "changes (all the batch's tokens, each prompt's noise shared by its completions)"), None
        needs = set()
        for name, model in (("policy", self.model), ("reference", self.ref_model)):
            if model is not None:
                support = shared_prompt_support(self.accelerator.unwrap_model(model), self.data_collator.max_length)
                if not support.enabled:
                    return f"{name} model: {support.reason}", None
                evaluated = name == "reference" and not model.training  # a reference in eval mode applies no dropout
                needs |= support.needs - ({"dropout"} if evaluated else set())
        dropout = training_dropout(self.accelerator.unwrap_model(self.model))
        if automatic and dropout:
            return (f"the policy applies dropout in training, at {dropout}: the shared-prompt row would give a "
                    "prompt's K completions one dropout noise, the plain layout K independent ones (shared_prompt=True "
                    "takes the shared-prompt layout anyway)"), None
        device = self.accelerator.device.type
        forced = forced_kernel_problem(frozenset(needs), device, self._half_precision())
        if forced:  # found here, not at the first forward
            return forced, None
        if not automatic or device == "cpu":
            return "", None  # the PyTorch paths implement every variant
        return self._gpu_varlen_kernel(frozenset(needs))

    def _gpu_varlen_kernel(self, needs: frozenset) -> tuple[str, str | None]:
        """For `shared_prompt=None` on an accelerator: ("", the fused varlen kernel the shared-prompt layout would run
        with), or (why not, None) where there is none for this model's attention variants (`needs`) or training is
        not in float16/bfloat16."""
        device = self.accelerator.device
        model = self.accelerator.unwrap_model(self.model)
        half = self._half_precision()
        if device.type != "cuda":
            kernel, why = None, f"nca-trl has no fused varlen kernel for {device.type}"
        else:
            kernel, why = cuda_varlen_kernel(original_attention_implementation(model), device, needs=needs)
            if kernel is not None and not half:
                kernel, why = None, "training runs in float32, and the fused varlen kernels take float16/bfloat16"
        if kernel is None:
            # Measured on an H200 (results/gpu_results.json): without a fused varlen kernel, the masked SDPA path
            # made a step 3.5-5x slower than the plain layout
            return f"{why} (set shared_prompt=True to force the shared-prompt layout)", None
        return "", kernel.name

    def _half_precision(self) -> bool:
        """Whether training computes in float16/bfloat16 (mixed precision, or a model loaded in it)."""
        model = self.accelerator.unwrap_model(self.model)
        dtype = getattr(model, "dtype", None)
        return bool(self.args.bf16 or self.args.fp16 or dtype in (torch.float16, torch.bfloat16))

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """`Trainer.predict`, whose outputs hold each sequence's padded logits: its batches take the plain layout
        (the same log-probs), whatever layout training uses."""
        with self._plain_batches():
            return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def evaluate(self, *args, **kwargs):
        """`evaluate`, in the plain layout where `compute_metrics` is set (it takes each sequence's padded logits):
        a `compute_metrics` set after construction, when training took the shared-prompt layout, stopped the run at
        its first evaluation."""
        with self._plain_batches(self.compute_metrics is not None):
            return super().evaluate(*args, **kwargs)

    def get_eval_dataloader(self, eval_dataset=None):
        """`Trainer.get_eval_dataloader`, whose cached loader (`dataloader_persistent_workers`) is rebuilt where its
        workers' copy of the collator builds the other layout than this evaluation's (`_plain_batches`)."""
        loader = super().get_eval_dataloader(eval_dataset)
        shared = bool(getattr(self.data_collator, "shared_prompt", False))
        if getattr(loader, "_nca_shared_prompt", shared) != shared:
            self._eval_dataloaders.pop(eval_dataset if isinstance(eval_dataset, str) else "eval", None)
            loader = super().get_eval_dataloader(eval_dataset)
        loader._nca_shared_prompt = shared
        return loader

    def _track_num_input_tokens(self, inputs):
        """`include_num_input_tokens_seen="non_padding"` counts a batch's attention mask, else its tokens other than the
        pad id: a shared-prompt row has no mask and no padding, and the pad id is EOS for a tokenizer without one, so
        every completion's EOS went uncounted. Here every token of the row counts."""
        if self.args.include_num_input_tokens_seen == "non_padding" and is_shared_prompt_batch(inputs):
            tokens = torch.as_tensor(inputs["input_ids"].numel(), device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()
            return
        super()._track_num_input_tokens(inputs)

    @contextlib.contextmanager
    def _plain_batches(self, plain: bool = True):
        """The collator builds plain padded batches inside (the same log-probs as the shared-prompt layout)."""
        collator = self.data_collator
        shared = plain and getattr(collator, "shared_prompt", False)
        if shared:
            collator.shared_prompt = False
        try:
            yield
        finally:
            if shared:
                collator.shared_prompt = True
