"""The language backbone that TRL's fused LM head runs, on models whose `base_model_prefix` names no submodule.

TRL 1.16's fused forward (`trl.trainer.utils.add_fused_lm_head`) runs `model.base_model` for the last hidden states
and applies the LM head to them itself. `base_model` is transformers' `getattr(model, model.base_model_prefix, model)`:
where the prefix names no submodule it is the model itself, whose output has no `last_hidden_state`, and every forward
fails (`AttributeError: 'MoeCausalLMOutputWithPast' object has no attribute 'last_hidden_state'`), in `trl.DPOTrainer`
as in these trainers, at the first step. In transformers 5.2x this is the case of:

- `Llama4ForCausalLM` (Llama 4's language model: `base_model_prefix` "language_model", decoder at `model`) and
  `MllamaForCausalLM` (Llama 3.2 Vision's: the same): `use_language_backbone` points the prefix of that model object
  at its decoder (`LANGUAGE_BACKBONES`, an allow-list: each entry's forward is `lm_head(model(...)[0])`, tested against
  the model's own logits). Only the object's attribute changes; its class, config and saved weights do not.
- the multimodal `Llama4ForConditionalGeneration`, which TRL loads for Llama 4 Scout / Maverick (its language model is a
  whole `Llama4ForCausalLM`, no backbone), and any other such model: refused at construction, naming the model and,
  where its language model loads alone (`MULTIMODAL_LANGUAGE_MODELS`), how to train that instead. `nca-trl train`
  refuses such a checkpoint before loading it (`check_checkpoint`, from its config's architectures).
"""

from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel, is_peft_model

from .models import model_class, text_model_config

__all__ = [
    "LANGUAGE_BACKBONES", "MULTIMODAL_LANGUAGE_MODELS", "check_checkpoint", "use_language_backbone",
    "use_language_backbones",
]

# Class name -> the attribute holding the decoder whose last hidden states the class's LM head reads
LANGUAGE_BACKBONES = {"Llama4ForCausalLM": "model", "MllamaForCausalLM": "model"}
# Multimodal class name -> the class `AutoModelForCausalLM.from_pretrained` loads from its checkpoint (text only)
MULTIMODAL_LANGUAGE_MODELS = {"Llama4ForConditionalGeneration": "Llama4ForCausalLM"}


def use_language_backbone(model, role: str) -> None:
    """Make `model.base_model` (the transformers model TRL's fused LM head was added to, PEFT's base model under PEFT;
    out of its DeepSpeed / DDP / FSDP1 / compile wrapper, as TRL prepares the reference model in `__init__`) its
    language backbone where it is the model itself: point the object's `base_model_prefix` at the decoder for a class
    of `LANGUAGE_BACKBONES` (FSDP2's `FSDP<name>` subclass included), else raise `ValueError` naming `role` ("policy",
    "reference model"), the class and the fix. Nothing changes where `base_model` is already a submodule (every other
    model TRL trains)."""
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    if model.base_model is not model:
        return
    name = model_class(model).__name__  # FSDP2's `fully_shard` renames the object's class FSDP<name>
    attribute = LANGUAGE_BACKBONES.get(name)
    if attribute is not None and isinstance(getattr(model, attribute, None), torch.nn.Module):
        model.base_model_prefix = attribute  # an instance attribute: the class's own prefix is untouched
        return
    raise ValueError(_no_backbone(role, name, model.base_model_prefix))


def check_checkpoint(path: str, setting: str, revision: str | None = None) -> None:
    """Before loading: raise a `SettingsError` with the message `use_language_backbone` would raise after loading,
    where the checkpoint at `path` (its config: `nca_trl.runtime.models.text_model_config`), given as `setting`
    (e.g. "model_name_or_path"), names a class of `MULTIMODAL_LANGUAGE_MODELS` first among its architectures, the
    class TRL loads it as. A config that cannot be read here is left to the loader (and the check after loading)."""
    import transformers

    from .errors import SettingsError

    try:
        architectures = getattr(text_model_config(path, revision), "architectures", None)
    except (OSError, ValueError):
        return
    name = (architectures or [None])[0]
    if name in MULTIMODAL_LANGUAGE_MODELS and hasattr(transformers, name):
        prefix = getattr(transformers, name).base_model_prefix
        raise SettingsError(_no_backbone(f"model at `{setting}` ({path})", name, prefix))


def _no_backbone(role: str, name: str, prefix: str) -> str:
    fix = "; TRL's DPOTrainer fails on it the same way."
    text_class = MULTIMODAL_LANGUAGE_MODELS.get(name)
    if text_class is not None:
        fix = (
            f". Use its language model ({text_class}, text only) instead: `AutoModelForCausalLM.from_pretrained(PATH)` "
            "loads it from the same checkpoint; pass that model object, or save it once with "
            "`AutoModelForCausalLM.from_pretrained(PATH).save_pretrained(OUT)` (and its tokenizer) and give OUT as the "
            "path. TRL's DPOTrainer fails on the multimodal model the same way."
        )
    return (
        f"The {role} is a {name}, whose `base_model_prefix` ({prefix!r}) names no submodule, so TRL's fused LM head "
        f"cannot find its language backbone and would fail at the first forward{fix}"
    )


def use_language_backbones(trainer) -> None:
    """`use_language_backbone` on the models a DPOTrainer's `__init__` added TRL's fused LM head to: the policy (its
    base model under PEFT) and the reference model, if any."""
    policy = trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model
    use_language_backbone(policy, "policy")
    if trainer.ref_model is not None:
        use_language_backbone(trainer.ref_model, "reference model")
