"""Tiny random-weight Mistral / Mixtral models with the real Mistral-7B tokenizer, built locally.

Nothing here touches the Hugging Face Hub: the tokenizer is the SentencePiece model that ships inside the PyPI
package `mistral-common` (`pip install nca-trl[dev]`), and the weights come from a config with a fixed seed. Tests,
the tiny recipes and the benchmark all build their models with these two functions.

Example:

```python
>>> from nca_trl.tiny import build_tiny_model
>>> path = build_tiny_model("out/tiny-mistral", arch="mistral", seed=0)
>>> # `path` now holds config.json, model.safetensors and the tokenizer files: pass it as `model=` to a trainer
```
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# The chat template of Mistral-7B-Instruct-v0.1 (the v1 tokenizer ships without one).
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
)

# name -> (hidden, intermediate, layers, heads, kv heads)
SIZES = {
    "tiny": (64, 128, 2, 4, 2),
    "small": (256, 512, 4, 8, 4),
    "50m": (512, 1024, 8, 8, 4),  # 52M parameters with the 32k vocabulary (untied embeddings)
}


def mistral_tokenizer_file() -> str:
    """Path of the Mistral-7B (v1) SentencePiece model shipped inside the `mistral-common` package, or the file named
    by the environment variable `NCA_TRL_MISTRAL_TOKENIZER` (for a machine where `mistral-common` cannot be
    installed with its dependencies)."""
    if os.environ.get("NCA_TRL_MISTRAL_TOKENIZER"):
        return os.environ["NCA_TRL_MISTRAL_TOKENIZER"]
    try:
        import mistral_common
    except ImportError as e:  # pragma: no cover - exercised only without the dev extra
        raise ImportError(
            "The tiny models use the real Mistral-7B tokenizer shipped in `mistral-common`. "
            "Install it with `pip install 'nca-trl[dev]'` (or `pip install mistral-common sentencepiece protobuf`)."
        ) from e
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: this mistral-common release does not ship the v1 tokenizer.")
    return str(path)


def save_mistral_tokenizer(out_dir: str | os.PathLike):
    """Write the Mistral-7B tokenizer (with the Mistral-Instruct chat template) to `out_dir` and return it loaded."""
    import json

    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (out_dir / stale).unlink(missing_ok=True)  # a stale tokenizer.json would take precedence over the new model
    shutil.copyfile(mistral_tokenizer_file(), out_dir / "tokenizer.model")
    # The special-token settings of mistralai/Mistral-7B-v0.1's tokenizer_config.json (BOS prepended, no EOS)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


DIGITS_VOCAB = list("0123456789>")


def save_tokenizer(core, out_dir: str | os.PathLike):
    """Give a `tokenizers.Tokenizer` Mistral's special tokens and BOS rule (`<s>` first; EOS and pad `</s>`), save it
    to `out_dir` and load it back as the HF tokenizer the trainers take as processing_class."""
    from tokenizers import processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def save_digits_tokenizer(out_dir: str | os.PathLike):
    """A character-level tokenizer over the digits and `>` (plus `<unk>`, `<s>`, `</s>`: 14 tokens), for the sorting
    task (`"31415>"` -> `"11345"`, `nca_trl.scoring.functions.sorted_digits`), saved to `out_dir` and loaded back."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *DIGITS_VOCAB])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return save_tokenizer(core, out_dir)


def model_config(tokenizer, arch: str = "mistral", size="tiny", max_position_embeddings: int = 4096):
    """A `MistralConfig` / `MixtralConfig` of the given size over `tokenizer`'s vocabulary and special tokens."""
    from transformers import MistralConfig, MixtralConfig

    hidden, inter, layers, heads, kv = SIZES[size] if isinstance(size, str) else size
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        sliding_window=None,
    )
    if arch == "mistral":
        return MistralConfig(**common)
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02)
    raise ValueError(f"arch must be 'mistral' or 'mixtral', got {arch!r}")


def build_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "mistral",
    seed: int = 0,
    size: str | tuple[int, int, int, int, int] = "tiny",
    max_position_embeddings: int = 4096,
    vocab: str = "mistral",
) -> str:
    """Build a random-weight causal LM of the Mistral or Mixtral architecture with the Mistral-7B tokenizer.

    Args:
        out_dir: folder to write the model and tokenizer to (created).
        arch: `"mistral"` or `"mixtral"` (4 experts, top-2, router aux loss coefficient 0.02).
        seed: weight initialisation seed; two different seeds give two different models.
        size: a key of `SIZES` or a tuple `(hidden, intermediate, layers, heads, kv_heads)`.
        vocab: `"mistral"` (the real Mistral-7B tokenizer) or `"digits"` (`save_digits_tokenizer`, 14 tokens: the
            sorting task of `recipes/tiny/iterate_nca.yaml`, which a tiny model learns in a minute on a CPU).

    Returns:
        `str(out_dir)`, loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if vocab not in ("mistral", "digits"):
        raise ValueError(f"vocab must be 'mistral' or 'digits', got {vocab!r}")
    tokenizer = save_mistral_tokenizer(out_dir) if vocab == "mistral" else save_digits_tokenizer(out_dir)
    config = model_config(tokenizer, arch, size, max_position_embeddings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    return str(out_dir)


def main(argv: list[str] | None = None) -> str:
    """`nca-trl make-tiny-model OUT_DIR [--arch mixtral] [--vocab digits]`: build and save; returns the path."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="nca-trl make-tiny-model",
        description="Build a tiny random-weight Mistral or Mixtral with the real Mistral-7B tokenizer (offline).",
    )
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=("mistral", "mixtral"), default="mistral")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--vocab", choices=("mistral", "digits"), default="mistral",
                        help="the real Mistral-7B tokenizer, or 14 character tokens for the sorting task "
                        "(recipes/tiny/iterate_nca.yaml)")
    ns = parser.parse_args(argv)
    path = build_tiny_model(ns.out_dir, arch=ns.arch, seed=ns.seed, size=ns.size, vocab=ns.vocab,
                            max_position_embeddings=64 if ns.vocab == "digits" else 4096)
    print(f"[nca-trl] tiny {ns.arch} ({ns.size}, {ns.vocab} vocabulary, seed {ns.seed}) written to "
          f"{os.path.abspath(path)}")
    return path
