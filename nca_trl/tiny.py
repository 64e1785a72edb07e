"""Tiny random-weight Mistral / Mixtral models with the real Mistral-7B tokenizer, built locally.

Nothing here touches the Hugging Face Hub: the tokenizer is the SentencePiece model that ships inside the PyPI
package `mistral-common` (a dependency of nca-trl, with `sentencepiece` and `protobuf` that convert it), and the
weights come from a config with a fixed seed. Tests, the tiny recipes and the benchmark all build their models with
these functions.

A build is deterministic and all or nothing: everything is written into a new temporary folder beside `out_dir` and
renamed into place at the end, so the same settings give byte-identical files whether or not `out_dir` existed (a
tokenizer converted next to an old `config.json` used to come out as another class, with another `tokenizer.json`),
and a failed build leaves no folder. `nca-trl make-tiny-model` refuses a folder that holds anything else, or another
model, unless `--overwrite`; what it needs is checked before anything is written.

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

from .runtime.errors import SettingsError

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


#: The packages a build needs beyond transformers, by vocabulary: (module to import, PyPI package, why)
REQUIREMENTS = {
    "mistral": (("mistral_common", "mistral-common", "the Mistral-7B tokenizer ships in it"),
                ("sentencepiece", "sentencepiece", "reads the tokenizer"),
                ("google.protobuf", "protobuf", "reads the tokenizer")),
    "digits": (),
}
#: Every file a build writes (and the tokenizer files older transformers wrote): a folder holding anything else is not
#: a tiny model's, and `make-tiny-model` leaves it alone unless `--overwrite`
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


class MissingDependencyError(SettingsError, ImportError):
    """A package the build needs is not installed (checked before anything is written)."""


def check_requirements(vocab: str = "mistral") -> None:
    """Raise `MissingDependencyError`, naming the package and the command that installs it, when a package the build
    of `vocab` needs is missing. Imports nothing heavy."""
    import importlib.util

    if vocab == "mistral" and os.environ.get("NCA_TRL_MISTRAL_TOKENIZER"):
        _check_tokenizer_override()
        needed = REQUIREMENTS["mistral"][1:]  # the tokenizer file is given: mistral-common is not needed
    else:
        needed = REQUIREMENTS.get(vocab, ())
    for module, package, why in needed:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # `google` missing altogether
            found = False
        if not found:
            raise MissingDependencyError(
                f"the tiny models need the Python package `{package}` ({why}), which is not installed: "
                f"`pip install {package}` (it is a dependency of nca-trl: `pip install nca-trl` installs it)."
            )


def _check_tokenizer_override() -> None:
    """The tokenizer file named by `NCA_TRL_MISTRAL_TOKENIZER` exists (the one path check of every command)."""
    from .runtime.paths import check_path

    check_path(os.environ["NCA_TRL_MISTRAL_TOKENIZER"], "NCA_TRL_MISTRAL_TOKENIZER", "file")


def mistral_tokenizer_file() -> str:
    """Path of the Mistral-7B (v1) SentencePiece model shipped inside the `mistral-common` package, or the file named
    by the environment variable `NCA_TRL_MISTRAL_TOKENIZER` (for a machine where `mistral-common` cannot be
    installed with its dependencies)."""
    if os.environ.get("NCA_TRL_MISTRAL_TOKENIZER"):
        _check_tokenizer_override()
        return os.environ["NCA_TRL_MISTRAL_TOKENIZER"]
    check_requirements("mistral")
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.exists():
        raise MissingDependencyError(f"{path} not found: this mistral-common release does not ship the v1 tokenizer "
                                     "(`pip install 'mistral-common>=1.5'`).")
    return str(path)


def _write_mistral_tokenizer(out_dir: Path) -> None:
    """The tokenizer files of the Mistral-7B tokenizer in `out_dir`, an empty folder: `AutoTokenizer` picks the
    tokenizer class from a `config.json` beside the files when there is one (another class, another `tokenizer.json`
    that encodes some texts differently), so the conversion never runs next to a model."""
    import json

    from transformers import AutoTokenizer

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
    # local_files_only: a local folder, and the saved config records the flag (HF_HUB_OFFLINE would change the bytes)
    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)


def save_mistral_tokenizer(out_dir: str | os.PathLike):
    """Write the Mistral-7B tokenizer (with the Mistral-Instruct chat template) to `out_dir` and return it loaded.

    The tokenizer is converted in an empty temporary folder and its files copied over those of `out_dir` (stale
    tokenizer files removed first), so the files are the same whatever `out_dir` already holds."""
    import tempfile

    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    check_requirements("mistral")
    with tempfile.TemporaryDirectory(prefix="nca-trl-tokenizer-") as tmp:
        _write_mistral_tokenizer(Path(tmp))
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in TOKENIZER_FILES:
            (out_dir / stale).unlink(missing_ok=True)  # a stale tokenizer.json would take precedence over the new model
        for written in sorted(Path(tmp).iterdir()):
            shutil.copyfile(written, out_dir / written.name)
    return AutoTokenizer.from_pretrained(out_dir, local_files_only=True)


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
    return AutoTokenizer.from_pretrained(out_dir, local_files_only=True)


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
    overwrite: bool = True,
) -> str:
    """Build a random-weight causal LM of the Mistral or Mixtral architecture with the Mistral-7B tokenizer.

    Args:
        out_dir: folder to write the model and tokenizer to (created, with its parents). Everything is written into a
            temporary folder beside it and renamed into place at the end: a failed build leaves `out_dir` as it was.
        arch: `"mistral"` or `"mixtral"` (4 experts, top-2, router aux loss coefficient 0.02).
        seed: weight initialisation seed; two different seeds give two different models.
        size: a key of `SIZES` or a tuple `(hidden, intermediate, layers, heads, kv_heads)`.
        vocab: `"mistral"` (the real Mistral-7B tokenizer) or `"digits"` (`save_digits_tokenizer`, 14 tokens: the
            sorting task of `recipes/tiny/iterate_nca.yaml`, which a tiny model learns in a minute on a CPU).
        overwrite: replace a folder that holds other files or another model (what scripts rebuilding their work
            folders want); with False that is a `SettingsError` (`nca-trl make-tiny-model` without `--overwrite`).
            A folder that already holds exactly these files is left as it is either way.

    Returns:
        `str(out_dir)`, loadable with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
    """
    install_tiny_model(out_dir, arch, seed, size, max_position_embeddings, vocab, overwrite)
    return str(out_dir)


def install_tiny_model(out_dir, arch="mistral", seed=0, size="tiny", max_position_embeddings=4096, vocab="mistral",
                       overwrite=False) -> str:
    """`build_tiny_model`, returning what happened to `out_dir`: "written" (it was missing or empty), "unchanged" (it
    already held these very files) or "replaced" (it held something else, and `overwrite`)."""
    if vocab not in ("mistral", "digits"):
        raise SettingsError(f"vocab must be 'mistral' or 'digits', got {vocab!r}")
    if arch not in ("mistral", "mixtral"):
        raise SettingsError(f"arch must be 'mistral' or 'mixtral', got {arch!r}")
    if isinstance(size, str) and size not in SIZES:
        raise SettingsError(f"size must be one of {sorted(SIZES)} or (hidden, intermediate, layers, heads, kv_heads), "
                            f"got {size!r}")
    out = Path(out_dir)
    held = _held_files(out)  # refuses a file, and (without overwrite) a folder of other things, before any write
    if held and not overwrite and not set(held) <= set(MODEL_FILES + TOKENIZER_FILES):
        others = sorted(set(held) - set(MODEL_FILES + TOKENIZER_FILES))
        raise SettingsError(f"{out} is not empty and holds what make-tiny-model does not write "
                            f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}): give another folder, or "
                            f"--overwrite to replace all of it.")
    check_requirements(vocab)
    tmp = _new_sibling(out, "tmp")
    try:
        _build_into(tmp, arch, seed, size, max_position_embeddings, vocab)
        if held:
            differ = _differences(tmp, out)
            if not differ:
                shutil.rmtree(tmp)
                return "unchanged"
            if not overwrite:
                raise SettingsError(f"{out} holds another model ({'; '.join(differ)}): give another folder, or "
                                    f"--overwrite to replace it.")
            old = _new_sibling(out, "old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            return "replaced"
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)  # over an empty folder too
        return "written"
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_into(folder: Path, arch, seed, size, max_position_embeddings, vocab) -> None:
    """The tokenizer, then the model, in `folder` (empty)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = save_mistral_tokenizer(folder) if vocab == "mistral" else save_digits_tokenizer(folder)
    config = model_config(tokenizer, arch, size, max_position_embeddings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)


def _held_files(out: Path) -> list[str]:
    """The names in `out` (none when it does not exist); a file at `out` is refused."""
    if out.is_dir():
        return sorted(p.name for p in out.iterdir())
    if out.exists() or out.is_symlink():
        raise SettingsError(f"{out} is a file, not a folder: give a folder for the model.")
    return []


def _new_sibling(out: Path, kind: str) -> Path:
    """A new hidden folder (`.NAME.<random>.nca-trl-KIND`) in the nearest existing folder above `out`: on the same
    filesystem as `out`, so that a rename moves it into place, and without creating `out`'s parents before the end."""
    import secrets

    parent = out.absolute().parent
    while not parent.is_dir():
        parent = parent.parent
    folder = parent / f".{out.name}.{secrets.token_hex(4)}.nca-trl-{kind}"
    folder.mkdir()
    return folder


def _differences(new: Path, old: Path) -> list[str]:
    """What differs between the files of two folders, in words (empty when every file is the same, byte for byte)."""
    import filecmp

    names_new, names_old = {p.name for p in new.iterdir()}, {p.name for p in old.iterdir()}
    differ = []
    if names_old - names_new:
        differ.append(f"not written by make-tiny-model: {', '.join(sorted(names_old - names_new))}")
    if names_new - names_old:
        differ.append(f"missing: {', '.join(sorted(names_new - names_old))}")
    changed = [n for n in sorted(names_new & names_old) if not filecmp.cmp(new / n, old / n, shallow=False)]
    if changed:
        differ.append(f"other contents: {', '.join(changed)}")
    return differ


def _refuse(message: str):
    raise SettingsError(message)


def main(argv: list[str] | None = None) -> str:
    """`nca-trl make-tiny-model OUT_DIR [--arch mixtral] [--vocab digits] [--overwrite]`: build and save; returns the
    path."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="nca-trl make-tiny-model",
        description="Build a tiny random-weight Mistral or Mixtral with the real Mistral-7B tokenizer (offline). The "
        "same settings always write the same files; a folder that holds anything else, or another model, is refused "
        "unless --overwrite.",
    )
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=("mistral", "mixtral"), default="mistral")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--vocab", choices=("mistral", "digits"), default="mistral",
                        help="the real Mistral-7B tokenizer, or 14 character tokens for the sorting task "
                        "(recipes/tiny/iterate_nca.yaml)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT_DIR when it holds anything else or another model")
    parser.error = _refuse  # one line, `nca-trl make-tiny-model: error: MESSAGE`, exit 2 (the command line's contract)
    ns = parser.parse_args(argv)
    what = install_tiny_model(ns.out_dir, arch=ns.arch, seed=ns.seed, size=ns.size, vocab=ns.vocab,
                              max_position_embeddings=64 if ns.vocab == "digits" else 4096, overwrite=ns.overwrite)
    said = {"written": "written to", "replaced": "written to (replacing what it held)",
            "unchanged": "already in (the same files, left as they are):"}[what]
    print(f"[nca-trl] tiny {ns.arch} ({ns.size}, {ns.vocab} vocabulary, seed {ns.seed}) {said} "
          f"{os.path.abspath(ns.out_dir)}")
    return ns.out_dir
