"""Which transformers class loads a text-generating checkpoint: `AutoModelForCausalLM`, or where that class does not
load the model type (Mistral 3: Mistral Small 3.x, Magistral, Ministral 3, which TRL loads by its config's
architecture, `Mistral3ForConditionalGeneration`) `AutoModelForImageTextToText`.

    >>> from nca_trl.runtime.models import load_text_model
    >>> model = load_text_model("outputs/tiny-mistral", dtype="auto")  # AutoModelForCausalLM.from_pretrained

`nca-trl generate` (and its benchmark), `nca-trl iterate`'s evaluation, `scripts/plan_memory.py` and the summary of
`nca-trl train` (`run_info.json`'s `model_loader`) use it. Remote code (a checkpoint's own classes, named by its
config's `auto_map`) counts only where it runs, with `trust_remote_code`; `remote_code_problem` is the refusal of a
local model of remote code without it, before anything is written (`nca-trl generate`, `nca-trl train`).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["auto_class_name", "load_text_model", "loader_of", "model_class", "remote_code_problem", "text_model_config"]


def auto_class_name(model_type: str | None, class_name: str | None = None, auto_map: dict | None = None) -> str:
    """`AutoModelForImageTextToText` where it, and not `AutoModelForCausalLM`, loads `model_type` (with `class_name`:
    where it maps the type to that class; remote code, `auto_map` given only where it runs: where `auto_map` names it
    alone), else `AutoModelForCausalLM` (also for a type this transformers does not know)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as IMAGE_TEXT,
    )

    if auto_map and {"AutoModelForCausalLM", "AutoModelForImageTextToText"} & set(auto_map):  # remote code
        image_text_only = "AutoModelForImageTextToText" in auto_map and "AutoModelForCausalLM" not in auto_map
    elif class_name is not None and CAUSAL.get(model_type) != class_name:
        image_text_only = IMAGE_TEXT.get(model_type) == class_name
    else:
        image_text_only = model_type not in CAUSAL and model_type in IMAGE_TEXT
    return "AutoModelForImageTextToText" if image_text_only else "AutoModelForCausalLM"


def model_class(model) -> type:
    """The class of `model`; under FSDP2 the class `fully_shard` subclassed (`FSDP<name>`, a name transformers strips
    when saving)."""
    return next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))


def loader_of(model) -> str:
    """The auto class that loads `model` once saved (`auto_class_name`): a PEFT model's base, by its `model_class`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cls = model_class(base)
    config = getattr(base, "config", None)
    remote = cls.__module__.startswith("transformers_modules")  # a stale auto_map of a built-in class does not count
    return auto_class_name(getattr(config, "model_type", None), cls.__name__,
                           getattr(config, "auto_map", None) if remote else None)


def text_model_config(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The config of the model at `path` (a LoRA adapter's folder: its base model's, at the base's own revision);
    remote code (the config class its `auto_map` names) runs only with `trust_remote_code`."""
    from transformers import AutoConfig

    adapter = Path(path) / "adapter_config.json"
    base = json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file() else path
    return AutoConfig.from_pretrained(base, revision=revision if base == path else None,
                                      trust_remote_code=trust_remote_code)


def load_text_model(path: str, revision: str | None = None, **kwargs):
    """`from_pretrained` of the auto class that loads `path` (`auto_class_name` of its config: `text_model_config`,
    remote code with `trust_remote_code=True` in `kwargs`), with `revision` and `kwargs`."""
    import transformers

    trust = kwargs.get("trust_remote_code", False)
    try:
        config = text_model_config(path, revision, trust)
        # transformers runs the auto_map's classes only with trust_remote_code: without it, a built-in type's stale
        # auto_map (checkpoints made before their type was built in) does not count
        model_type, auto_map = config.model_type, getattr(config, "auto_map", None) if trust else None
    except ValueError:  # a model type this transformers does not know (remote code not trusted): the causal class
        model_type = auto_map = None
    auto = getattr(transformers, auto_class_name(model_type, auto_map=auto_map))
    return auto.from_pretrained(path, revision=revision, **kwargs)


def remote_code_problem(path: str | None, trust_remote_code: bool, setting: str) -> str | None:
    """Where the local checkpoint folder `path` is a model of remote code (its config.json names an `auto_map` for a
    `model_type` this transformers does not know) and `trust_remote_code` is off: one line naming `setting`, the
    switch that allows it; else None. Hub ids and unreadable configs are left to the loader."""
    config = Path(str(path)) / "config.json" if path else None
    if trust_remote_code or config is None or not config.is_file():
        return None
    try:
        raw = json.loads(config.read_text())
    except ValueError:
        return None
    if not isinstance(raw, dict) or "AutoConfig" not in (raw.get("auto_map") or {}):
        return None
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # registered types included

    if raw.get("model_type") in CONFIG_MAPPING:
        return None
    return (f"{path} is a model of remote code (model_type {raw.get('model_type')!r}, its own Python files named by "
            f"config.json's auto_map), which runs only when allowed: set {setting} after reading those files.")
