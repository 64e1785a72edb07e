"""Which transformers class loads a text-generating checkpoint, as TRL's `create_model_from_path` loads it by its
config's architecture: `AutoModelForCausalLM`, or for a multimodal model that class does not load (Mistral 3:
Mistral Small 3.x, Magistral, Ministral 3) `AutoModelForImageTextToText`.

    >>> from nca_trl.runtime.models import load_text_model
    >>> model = load_text_model("outputs/tiny-mistral", dtype="auto")  # AutoModelForCausalLM.from_pretrained

`nca-trl generate` (and its benchmark), `nca-trl iterate`'s evaluation and the summary of `nca-trl train`
(`run_info.json`'s `model_loader`) use it.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["auto_class_name", "load_text_model", "loader_of"]


def auto_class_name(model_type: str | None, class_name: str | None = None) -> str:
    """`AutoModelForCausalLM` where it loads `model_type` (or the type is unknown: remote code), else
    `AutoModelForImageTextToText` where that does; with `class_name`, the class itself where neither auto class gives
    it."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as IMAGE_TEXT,
    )

    if class_name is None:
        multimodal_only = model_type not in CAUSAL and model_type in IMAGE_TEXT
        return "AutoModelForImageTextToText" if multimodal_only else "AutoModelForCausalLM"
    if CAUSAL.get(model_type) == class_name or (model_type not in CAUSAL and class_name.endswith("ForCausalLM")):
        return "AutoModelForCausalLM"
    return "AutoModelForImageTextToText" if IMAGE_TEXT.get(model_type) == class_name else class_name


def loader_of(model) -> str:
    """The class that loads `model` once saved (`auto_class_name`; a PEFT model's base)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return auto_class_name(getattr(getattr(base, "config", None), "model_type", None), type(base).__name__)


def load_text_model(path: str, revision: str | None = None, **kwargs):
    """`from_pretrained` of the auto class that loads `path` (`auto_class_name` of its config's model type; a LoRA
    adapter's folder: its base model's), with `revision` and `kwargs`."""
    import transformers
    from transformers import AutoConfig

    adapter = Path(path) / "adapter_config.json"
    base = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file() else path
    try:
        model_type = AutoConfig.from_pretrained(base, revision=revision if base == path else None).model_type
    except ValueError:  # a model type this transformers does not know (remote code): as before, the causal class
        model_type = None
    auto = getattr(transformers, auto_class_name(model_type))
    return auto.from_pretrained(path, revision=revision, **kwargs)
