"""An explicit reference model is checked against the policy before anything is computed: it scores the policy's
token ids, so it must have the policy's vocabulary.

A reference of a smaller vocabulary failed at the first step deep inside torch (`IndexError: index out of range in
self`, in the embedding); one of a larger vocabulary (another tokenizer) trained to the end on meaningless log-probs,
exit 0. `trl.DPOTrainer` checks neither.

    >>> check_reference_vocabulary("outputs/tiny-mistral", ref_model)  # raises ValueError if the vocabularies differ
"""

from __future__ import annotations

__all__ = ["check_reference_vocabulary", "vocabulary_size"]


def vocabulary_size(config) -> int | None:
    """The token vocabulary of a model config (its text config's, for a multimodal model); None where unknown."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return size if isinstance(size, int) else None


def check_reference_vocabulary(model, ref_model, tokenizer=None, revision: str | None = None,
                               trust_remote_code: bool = False) -> None:
    """`ValueError` where `ref_model` (a model, or None: nothing to check) has another vocabulary size than the policy
    `model` (a model, or its path / Hub id: its config is read), or fewer entries than `tokenizer` has tokens. A
    policy config that cannot be read here is not checked (the trainer's own loading then says why)."""
    if ref_model is None or not hasattr(ref_model, "config"):
        return
    ref_size = vocabulary_size(ref_model.config)
    if ref_size is None:
        return
    if isinstance(model, str):
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            config = None
        name = model
    else:
        config, name = getattr(model, "config", None), getattr(getattr(model, "config", None), "_name_or_path", "")
    size = vocabulary_size(config) if config is not None else None
    ref_name = getattr(ref_model.config, "_name_or_path", "") or type(ref_model).__name__
    fix = ("The reference scores the policy's token ids: use a reference with the policy's tokenizer and vocabulary "
           "(its SFT starting point, say), or no `ref_model` (the policy's initial weights are the reference).")
    if size is not None and size != ref_size:
        raise ValueError(f"`ref_model` ({ref_name}) has a vocabulary of {ref_size} tokens and the policy ({name}) one "
                         f"of {size}. {fix}")
    # Only where the policy's size is unknown: a tokenizer may count a few more tokens than a model's vocabulary
    tokens = len(tokenizer) if size is None and tokenizer is not None and hasattr(tokenizer, "__len__") else None
    if tokens is not None and tokens > ref_size:
        raise ValueError(f"`ref_model` ({ref_name}) has a vocabulary of {ref_size} tokens, fewer than the tokenizer's "
                         f"{tokens}. {fix}")
