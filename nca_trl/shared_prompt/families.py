"""Which models the shared-prompt layout is exact for: the allow-lists, and the rule that reads a model against them.

The layout (`nca_trl.shared_prompt.packing`) gives each completion its prompt and its own earlier tokens through
attention with segment boundaries. That is exact only where every layer that mixes positions is such attention: a Mamba
/ SSM state, a short convolution or linear attention would carry one completion into the next (DESIGN §7), and a model
that applies a sliding window through its mask, or does not pass keyword arguments on to its attention, would not see
the boundaries. So a model takes the layout only if its family was tested exact against the plain layout
(`tests/test_model_families.py`): `shared_prompt_support` decides it once, from the config and the modules, and nothing
it does not know is admitted. `nca_trl.shared_prompt.packing.shared_prompt_forward` checks every forward again.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
from dataclasses import dataclass, field

from .varlen import fused_head_width

__all__ = [
    "ATTENTION_LAYER_TYPES", "EXACT_FAMILIES", "EXACT_MULTIMODAL", "ROUTED_PREFIX", "SharedPromptSupport",
    "WINDOW_FAMILIES",
    "attention_modules", "attention_variants", "declares_sliding_window", "original_attention_implementation",
    "disable_attention_dropout", "shared_prompt_support", "training_dropout",
]

# The attention implementation name `packing` registers its attention under: `ROUTED_PREFIX + original`
ROUTED_PREFIX = "nca_shared_prompt|"
# Attention implementations whose models can take the layout (the attention itself is always `varlen`'s)
_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4")
# The model families whose every position-mixing layer is attention that the shared-prompt path implements (plain,
# sliding-window, softcapped, with sinks, wide heads), each tested against the plain layout
# (tests/test_model_families.py): the text config's `model_type` -> transformers' package of its modeling code. A
# family not listed is plain (DESIGN §7: SSM / Mamba state, short convolutions and linear attention carry one
# completion into the next).
EXACT_FAMILIES = {
    "llama": "llama", "mistral": "mistral", "ministral": "ministral", "ministral3": "ministral3", "mixtral": "mixtral",
    "qwen2": "qwen2", "qwen2_moe": "qwen2_moe", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe", "phi": "phi",
    "phi3": "phi3", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gpt_oss": "gpt_oss",
    "cohere": "cohere", "cohere2": "cohere2", "olmo": "olmo", "olmo2": "olmo2", "olmo3": "olmo3", "olmoe": "olmoe",
    "granite": "granite", "granitemoe": "granitemoe", "granitemoeshared": "granitemoeshared",
    "starcoder2": "starcoder2", "smollm3": "smollm3", "glm4": "glm4", "glm4_moe": "glm4_moe",
    "glm4_moe_lite": "glm4_moe_lite", "deepseek_v3": "deepseek_v3", "ernie4_5_moe": "ernie4_5_moe",
    "seed_oss": "seed_oss", "exaone4": "exaone4", "hunyuan_v1_dense": "hunyuan_v1_dense",
    "hunyuan_v1_moe": "hunyuan_v1_moe", "minimax_m2": "minimax_m2", "apertus": "apertus", "helium": "helium",
    "gpt_neox": "gpt_neox", "deepseek_v2": "deepseek_v2", "ernie4_5": "ernie4_5", "gpt2": "gpt2",
    "gpt_bigcode": "gpt_bigcode", "opt": "opt", "arcee": "arcee", "bitnet": "bitnet", "cohere2_moe": "cohere2_moe",
    "exaone_moe": "exaone_moe", "granite_swa": "granite_swa", "vaultgemma": "vaultgemma", "exaone": "llama",
    "internlm3": "llama", "nanochat": "nanochat", "hyperclovax": "hyperclovax", "minicpm5_moe": "minicpm5_moe",
    "solar_open": "solar_open", "jais2": "jais2", "hy_v3": "hy_v3", "afmoe": "afmoe", "mellum": "mellum",
    "cwm": "cwm", "mimo_v2_flash": "mimo_v2_flash", "glm": "glm", "flex_olmo": "flex_olmo",
    # Gemma 3n and Gemma 4 (per-layer embeddings, layers that reuse an earlier layer's keys and values, AltUp, Gemma
    # 4's 512-wide global heads: the `wide_heads` variant, which no fused kernel takes)
    "gemma3n_text": "gemma3n", "gemma4_text": "gemma4", "gemma4_unified_text": "gemma4_unified",
    # dots.llm1 (windows), Youtu-LLM (MLA), Apertus 1.5, and two types transformers builds GLM-4-MoE for
    "dots1": "dots1", "youtu": "youtu", "apertus1p5_text": "apertus1p5", "sarvam_moe": "glm4_moe",
    "param2moe": "glm4_moe",
    # The language models of Qwen2.5-VL and Qwen3-VL (multimodal rotary positions: on text, three equal rows)
    "qwen2_5_vl_text": "qwen2_5_vl", "qwen3_vl_text": "qwen3_vl",
    # Granite 4: only its dense checkpoints (every layer attention) take the layout; its hybrids' Mamba2 layers are
    # `linear_attention` in `config.layer_types`, which keeps them plain
    "granitemoehybrid": "granitemoehybrid",
}
# The families of `EXACT_FAMILIES` whose attention gives the kernel its sliding window (the attention call's
# `sliding_window` keyword), tested exact with windows -> the config flag that must be true for it to (None: always).
# A window in any other family lives in its mask alone (Qwen2-MoE's attention never passes it on; SmolLM3's only with
# `use_sliding_window`, while its mask follows `layer_types`), which the layout does not build: plain.
WINDOW_FAMILIES = {
    "mistral": None, "ministral": None, "ministral3": None, "mixtral": None, "phi3": None, "starcoder2": None,
    "qwen2": None, "qwen3": None, "qwen3_moe": None, "smollm3": "use_sliding_window", "gemma2": None,
    "gemma3_text": None, "vaultgemma": None, "gpt_oss": None, "granite_swa": None, "cohere2": None,
    "cohere2_moe": None, "olmo3": None, "exaone4": None, "exaone_moe": None, "afmoe": None, "mellum": None,
    "cwm": None, "mimo_v2_flash": None, "gemma3n_text": None, "gemma4_text": None, "gemma4_unified_text": None,
    "dots1": None,
}
# Multimodal models whose language model is one of `EXACT_FAMILIES`, tested exact on text-only batches: the model
# type -> transformers' package of the multimodal class (its vision tower never runs on text)
EXACT_MULTIMODAL = {"gemma3": "gemma3", "gemma4": "gemma4", "gemma4_unified": "gemma4_unified", "mistral3": "mistral3",
                    "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "llava": "llava"}
# The layer kinds of `config.layer_types` that are attention
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
# Only to name the layer in the reason a family not listed is plain (the rule itself is the allow-list above)
_MIXER_NAMES = re.compile(r"Mamba|Mixer|Conv|DeltaNet|LinearAttention|SSM|RWKV|Recurren", re.IGNORECASE)


@dataclass
class SharedPromptSupport:
    """Whether a model can take the shared-prompt layout (else `reason`, naming the layer or setting), and the
    attention variants (`nca_trl.shared_prompt.varlen.FEATURES`) a kernel must implement for it."""

    enabled: bool
    reason: str = ""
    needs: frozenset = field(default_factory=frozenset)


def shared_prompt_support(model, max_length: int | None = None) -> SharedPromptSupport:
    """Whether `model` computes the same log-probs in the shared-prompt layout as in the plain one, decided from its
    config and modules by an allow-list (nothing is changed).

    Exact: decoder-only models of `EXACT_FAMILIES` (transformers' own modeling code; a multimodal model of
    `EXACT_MULTIMODAL` on text, by its language model), every `config.layer_types` entry in `ATTENTION_LAYER_TYPES`,
    causal attention dispatched through transformers' `AttentionInterface`, loaded with `eager`, `sdpa`,
    `flash_attention_2/3/4` or a hub flash-attention kernel; a sliding window shorter than `max_length` (if given)
    only in `WINDOW_FAMILIES`, whose attention gives it to the kernel. `needs` holds the variants its attention uses
    (`attention_variants`; `sliding_window` only where a window is shorter than `max_length`).
    """
    config = model.config.get_text_config()
    implementation = original_attention_implementation(model)
    peft_config = getattr(model, "peft_config", None)
    if peft_config and any(c.is_prompt_learning for c in peft_config.values()):
        return SharedPromptSupport(False, "prompt-learning PEFT adds virtual tokens to every sequence")
    if implementation not in _IMPLEMENTATIONS and "/" not in implementation:
        return SharedPromptSupport(
            False, f"attention implementation {implementation!r} is not one of {', '.join(_IMPLEMENTATIONS)} or a "
            "hub flash-attention kernel"
        )
    if implementation == "eager" and _declared(config, "reorder_and_upcast_attn"):
        return SharedPromptSupport(
            False, "config.reorder_and_upcast_attn=True with eager attention: GPT-2's attention then upcasts to "
            "float32 in its own code, which the routed attention would skip (plain batches too)"
        )
    language = _language_model(model)
    if language is not model:  # a multimodal model: its language model must be exact, and the batches text only
        wrapper = getattr(model.config, "model_type", None)
        own = f"transformers.models.{EXACT_MULTIMODAL.get(wrapper)}."
        top = next((m for m in model.modules() if type(m).__module__.startswith("transformers.models.")), model)
        if wrapper not in EXACT_MULTIMODAL or not type(top).__module__.startswith(own) or language is None:
            return SharedPromptSupport(
                False, f"multimodal model {type(top).__name__} (model type {wrapper!r}) is not among those tested "
                "exact with the shared-prompt layout on text (nca_trl.shared_prompt.families.EXACT_MULTIMODAL)"
            )
    model_type = getattr(config, "model_type", None)
    for i, kind in enumerate(getattr(config, "layer_types", None) or ()):
        if kind not in ATTENTION_LAYER_TYPES:
            return SharedPromptSupport(
                False, f"layer {i} of {type(model).__name__} is {kind!r} (config.layer_types), not attention: the "
                "layout is exact only where every position-mixing layer is attention"
            )
    package = EXACT_FAMILIES.get(model_type)
    if package is None:
        mixer = next((f"; its {n} ({type(m).__name__}) mixes positions outside attention"
                      for n, m in model.named_modules() if _MIXER_NAMES.search(type(m).__name__)), "")
        return SharedPromptSupport(
            False, f"{type(model).__name__} (model type {model_type!r}) is not among the families tested exact with "
            f"the shared-prompt layout (nca_trl.shared_prompt.families.EXACT_FAMILIES){mixer}"
        )
    own = f"transformers.models.{package}."
    modules = {type(m).__module__: type(m).__name__ for m in language.modules()}
    foreign = [f"{name} ({where})" for where, name in modules.items()
               if where.startswith("transformers.models.") and not where.startswith(own)]
    if foreign:
        return SharedPromptSupport(False, f"module {foreign[0]} is not {model_type}'s own code")
    attention = attention_modules(model)
    if not attention or not all(_uses_attention_interface(type(m).__module__) for m in attention):
        return SharedPromptSupport(False, f"{type(model).__name__} does not dispatch attention via AttentionInterface")
    copy = next((type(m).__name__ for m in attention if getattr(m, "config", config) is not config), None)
    if copy:
        return SharedPromptSupport(
            False, f"{copy} holds a config of its own (a copy, as PEFT's modules_to_save makes of a module it trains "
            "whole), which routing the model's attention would not reach"
        )
    two_way = next((type(m).__name__ for m in attention if getattr(m, "is_causal", None) is not True), None)
    if two_way:
        return SharedPromptSupport(
            False, f"{two_way} is not causal (is_causal is not True, e.g. config.use_bidirectional_attention): the "
            "layout's attention is causal"
        )
    needs = attention_variants(model, attention, longest=max_length)  # no window that no segment outgrows
    if "sliding_window" in needs:
        flag = WINDOW_FAMILIES.get(model_type)
        if model_type not in WINDOW_FAMILIES or (flag and not getattr(config, flag, False)):
            unless = f" unless config.{flag} is true" if flag else ""
            return SharedPromptSupport(
                False, f"{type(model).__name__} has a sliding window (config.sliding_window={_sliding_window(config)}) "
                f"that {model_type}'s attention does not give its kernel{unless}: its mask alone applies it, and the "
                "layout builds no mask (nca_trl.shared_prompt.families.WINDOW_FAMILIES)"
            )
    return SharedPromptSupport(True, needs=frozenset(needs))


def attention_modules(model) -> list:
    """The attention modules of `model`'s language model (modules whose class name ends in `Attention`; a multimodal
    model's other towers left out)."""
    language = _language_model(model)
    return [m for m in (model if language is None else language).modules() if type(m).__name__.endswith("Attention")]


def _language_model(model):
    """The module of `model` that holds its text config (`model` itself unless multimodal), or None if none does."""
    config = model.config.get_text_config()
    if config is model.config:
        return model
    return next((m for m in model.modules() if m is not model and getattr(m, "config", None) is config), None)


def attention_variants(model, attention: list | None = None, longest: int | None = None) -> set[str]:
    """The attention variants (`nca_trl.shared_prompt.varlen.FEATURES`) `model` uses: `sliding_window`
    (`_sliding_window`; where `longest`, the most keys a segment has, is given: only a window shorter than that, as a
    longer one masks nothing in either layout), `softcap` (`config.attn_logit_softcapping`), `sinks` (attention
    modules with `sinks`, as GPT-OSS's), `wide_heads` (attention modules with heads of a width no fused kernel takes,
    as Gemma 4's global layers), `dropout` (attention modules whose attention dropout, passed in training, is above 0:
    `_attention_dropout`). A config setting counts only where the config's class declares it (`_declared`).
    `attention`: `attention_modules(model)` where the caller has it already."""
    variants = set()
    config = model.config.get_text_config()
    window = _sliding_window(config)
    if window is not None and (longest is None or window < longest):
        variants.add("sliding_window")
    if _declared(config, "attn_logit_softcapping") is not None:
        variants.add("softcap")
    if attention is None:
        attention = attention_modules(model)
    if any(getattr(m, "sinks", None) is not None for m in attention):
        variants.add("sinks")
    if any(not fused_head_width(*_head_dims(m)) for m in attention):
        variants.add("wide_heads")
    if any(_attention_dropout(m) > 0 for m in attention):
        variants.add("dropout")
    return variants


def training_dropout(model) -> str:
    """Where `model` applies dropout in training ("" if nowhere): an `nn.Dropout` with p > 0 (left on by
    `disable_dropout=False`, e.g. LoRA's `lora_dropout`), or an attention module's dropout (`_attention_dropout`)."""
    for name, module in model.named_modules():
        if any(c.__name__ == "_DropoutNd" for c in type(module).__mro__):  # torch's nn.Dropout and its kin
            p = module.p
        else:
            p = _attention_dropout(module) if type(module).__name__.endswith("Attention") else 0.0
        if p > 0:
            return f"{name or type(module).__name__} (p={p:g})"
    return ""


def disable_attention_dropout(*models) -> None:
    """`disable_dropout` where TRL's does not reach: TRL zeroes `nn.Dropout` modules only, and some attention modules
    pass their dropout to the attention call as a float (GPT-BigCode's `attn_pdrop`, Seed-OSS's `attention_dropout`):
    set to 0 on every attention module of `models`."""
    for model in models:
        for module in model.modules():
            if type(module).__name__.endswith("Attention"):
                for name in _DROPOUT_NAMES:
                    if _probability(getattr(module, name, None)) > 0:  # a number (an nn.Dropout is TRL's to zero)
                        setattr(module, name, 0.0)


_DROPOUT_NAMES = ("attention_dropout", "attn_dropout", "attn_pdrop", "dropout")


def _probability(value) -> float:
    """`value` as a dropout probability if it is a number (not a bool), else 0."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _attention_dropout(attention) -> float:
    """The dropout an attention module passes to its attention call in training: its `attention_dropout`,
    `attn_dropout`, `attn_pdrop` or `dropout`, a float or an `nn.Dropout`'s `p` (which TRL's `disable_dropout` zeroes;
    a float it leaves, as GPT-BigCode's `attn_pdrop`). The forward passes it on too: `shared_prompt_attention` asks for
    a kernel that applies whatever a call gets."""
    for name in _DROPOUT_NAMES:
        value = getattr(attention, name, None)
        p = _probability(getattr(value, "p", value))
        if p > 0:
            return p
    return 0.0


def _head_dims(attention) -> tuple[int, int]:
    """The widths of an attention module's heads: its queries' and keys' (MLA's `qk_head_dim`, else `head_dim`, or
    GPT-NeoX's `head_size`), and its values' (MLA's `v_head_dim`, else the same)."""
    def dim(*names):
        return next((d for d in (getattr(attention, n, None) for n in names) if isinstance(d, int)), None)

    query = dim("qk_head_dim", "head_dim", "head_size") or 0
    return query, dim("v_head_dim") or query


def _sliding_window(config) -> int | None:
    """The sliding window some attention layer of a model with this (text) config applies, or None (a window its
    config class does not declare is not one: `_declared`)."""
    window = _declared(config, "sliding_window")
    layer_types = _declared(config, "layer_types")  # Mistral's masks, for one, read no layer_types
    return window if layer_types is None or "sliding_attention" in layer_types else None


def declares_sliding_window(config) -> bool:
    """Whether the class of `config` declares a `sliding_window` setting (a family whose masks can apply one)."""
    return "sliding_window" in _settings(type(config))


def _declared(config, name: str):
    """`config.<name>` where the config's class declares that setting, else None: a key that a checkpoint's
    config.json carries over from another family (a `sliding_window` in a converted Llama's) is kept on the config,
    but the family's masks never apply it (`packing.shared_prompt_attention` applies one that the family's attention
    passes on anyway, as OLMoE's does, only where the original kernel would: flash attention)."""
    return getattr(config, name, None) if name in _settings(type(config)) else None


@functools.cache
def _settings(config_class) -> frozenset[str]:
    """The settings a config class declares (its `__init__`'s parameters)."""
    return frozenset(inspect.signature(config_class.__init__).parameters)


def original_attention_implementation(model) -> str:
    """The attention implementation `model` was loaded with (before `packing.enable_shared_prompt` routed it)."""
    implementation = model.config.get_text_config()._attn_implementation or "eager"
    return implementation.removeprefix(ROUTED_PREFIX)


def _uses_attention_interface(module_name: str) -> bool:
    """Whether the modeling file of `module_name` looks its attention up in transformers' `AttentionInterface`."""
    source = getattr(sys.modules.get(module_name), "__file__", None)
    if source is None:
        return False
    with open(source) as f:
        return "ALL_ATTENTION_FUNCTIONS.get_interface" in f.read()
