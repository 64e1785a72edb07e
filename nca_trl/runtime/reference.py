"""An explicit reference model is checked against the policy's tokenizer before anything is computed: it scores the
policy's token ids, so its vocabulary must hold every one of them.

A reference of a smaller vocabulary failed at the first step deep inside torch (`IndexError: index out of range in
self`, in the embedding). `trl.DPOTrainer` does not check it. A larger vocabulary is accepted: vocabularies are
padded (Qwen2.5 0.5B's 151936 entries against 7B's 152064, an SFT model resized by a chat-template helper), and its
size alone cannot tell another tokenizer from padding.

    >>> check_reference_vocabulary(ref_model, tokenizer)  # raises SettingsError if the reference is too small
"""

from __future__ import annotations

from .errors import SettingsError

__all__ = ["check_reference_vocabulary", "vocabulary_size"]


def vocabulary_size(config) -> int | None:
    """The token vocabulary of a model config (its text config's, for a multimodal model); None where unknown."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    return size if isinstance(size, int) else None


def check_reference_vocabulary(ref_model, tokenizer) -> None:
    """`SettingsError` where `ref_model` (a model, or None: nothing to check) has fewer vocabulary entries than
    `tokenizer` (the policy's; None: not checked) has tokens."""
    if ref_model is None or tokenizer is None or not hasattr(ref_model, "config") or not hasattr(tokenizer, "__len__"):
        return
    ref_size, tokens = vocabulary_size(ref_model.config), len(tokenizer)
    if ref_size is not None and tokens > ref_size:
        name = getattr(ref_model.config, "_name_or_path", "") or type(ref_model).__name__
        raise SettingsError(
            f"`ref_model` ({name}) has a vocabulary of {ref_size} tokens, fewer than the policy's tokenizer's {tokens}: "
            "it cannot score the policy's token ids. Use a reference with the policy's tokenizer (its SFT starting "
            "point, say), or no `ref_model` (the policy's initial weights are the reference).")
