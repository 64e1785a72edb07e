"""Reward sources of `nca-trl score`: reward functions named by a spec, and a reward model.

Every source is a callable in TRL's `GRPOTrainer` convention, `source(prompts=[...], completions=[...], **columns)
-> list[float | None]`, one value per completion; [`RewardModelScorer`] is such a callable around an
`AutoModelForSequenceClassification`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path

from ..runtime.errors import SettingsError

__all__ = ["BUNDLED", "RewardModelScorer", "load_reward_function", "load_sources"]

# Bare names accepted by `--reward_funcs`: nca-trl's own, and those of TRL's `trl grpo` script that need no
# arguments and no `completion_ids`
BUNDLED = {
    "sorted_digits": ("nca_trl.scoring.functions", "sorted_digits"),
    "ascii_letters": ("nca_trl.scoring.functions", "ascii_letters"),
    "accuracy_reward": ("trl.rewards", "accuracy_reward"),
    "reasoning_accuracy_reward": ("trl.rewards", "reasoning_accuracy_reward"),
    "think_format_reward": ("trl.rewards", "think_format_reward"),
}
_SPEC_FORMS = "`module:function`, `module.function`, `path/to/file.py:function` or a bundled name (" + ", ".join(
    BUNDLED) + ")"


def _split_spec(spec: str) -> tuple[str, str]:
    if spec in BUNDLED:
        return BUNDLED[spec]
    if ":" in spec:
        module, name = spec.rsplit(":", 1)
    elif "." in spec and not spec.endswith(".py"):
        module, name = spec.rsplit(".", 1)
    else:
        raise ValueError(f"Reward function {spec!r}: expected {_SPEC_FORMS}.")
    if not module or not name:
        raise ValueError(f"Reward function {spec!r}: expected {_SPEC_FORMS}.")
    return module, name


def _import_file(spec: str, path: Path):
    if not path.is_file():
        raise ValueError(f"Reward function {spec!r}: the file {path} does not exist.")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    module_name = f"_nca_trl_rewards_{resolved.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up there
    try:
        module_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[module_name]
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"Reward function {spec!r}: running {path} failed: {type(e).__name__}: {e}") from e
    return module


def _import_module(spec: str, module_name: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` and TRL's `trl grpo` script: modules of the current folder
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(
                f"Reward function {spec!r}: no module named {e.name!r} (searched the current folder and sys.path). "
                "Install it, run from the folder that holds it, set PYTHONPATH, or give the file: "
                "`path/to/file.py:function`."
            ) from e
        raise ValueError(f"Reward function {spec!r}: importing {module_name!r} failed: {e}") from e
    except Exception as e:
        raise ValueError(f"Reward function {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}") from e


def load_reward_function(spec: str):
    """The callable that `spec` names: `module:function`, `module.function`, `path/to/file.py:function`, or a name of
    `BUNDLED` (`sorted_digits`, `ascii_letters`, TRL's `accuracy_reward`, ...). Raises a `ValueError` naming the spec
    when the module or file cannot be imported or has no such attribute, a `TypeError` when it is not callable."""
    spec = str(spec).strip()
    module_name, name = _split_spec(spec)
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        module = _import_file(spec, Path(module_name).expanduser())
    else:
        module = _import_module(spec, module_name)
    try:
        func = getattr(module, name)
    except AttributeError:
        import difflib

        available = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"it has {', '.join(available[:12]) or 'none'}"
        raise ValueError(f"Reward function {spec!r}: {module_name} has no attribute {name!r} ({hint}).") from None
    if not callable(func):
        raise TypeError(f"Reward function {spec!r}: {module_name}.{name} is a {type(func).__name__}, not callable.")
    return func


class RewardModelScorer:
    """An `AutoModelForSequenceClassification` reward model (num_labels=1) as a reward source.

    Each (prompt, completion) is tokenized with the reward model's own tokenizer the way `trl.RewardTrainer`
    tokenizes its training rows: a conversational row is `prompt + completion` through the tokenizer's chat template
    (with the row's `tools` / `chat_template_kwargs`), a standard row is the text `prompt + completion` with EOS
    appended (unless already there) and the tokenizer's special tokens (e.g. BOS). (`GRPOTrainer` formats
    conversational rows the same way but leaves BOS and EOS out of standard text.) Sequences longer than
    `max_length` keep their last `max_length` tokens (the head reads the last one, whatever the tokenizer's
    `truncation_side`) and are counted. Batches of `batch_size` sequences
    sorted by length, right-padded with the pad token (EOS when the tokenizer has none, which is also written to the
    model config, as `GRPOTrainer` does); the reward is `logits[:, 0]` as a float.
    """

    def __init__(self, path: str, *, revision: str = "main", batch_size: int = 8, max_length: int | None = None,
                 dtype: str = "auto", device=None, trust_remote_code: bool = False, conversational: bool = False):
        import torch
        from transformers import (
            AutoConfig,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
        config = AutoConfig.from_pretrained(path, **kwargs)
        if config.num_labels != 1:
            raise SettingsError(
                f"The reward model {path} (`reward_model`) has num_labels={config.num_labels}: `nca-trl score` needs one scalar per "
                "sequence, a sequence-classification model with num_labels=1 (as `trl.RewardTrainer` trains)."
            )
        architectures = getattr(config, "architectures", None) or []
        if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise SettingsError(
                f"The reward model {path} (`reward_model`) is a {', '.join(architectures)}, not a ...ForSequenceClassification model: "
                "its score head would be random. Pass a reward model trained with a num_labels=1 head."
            )
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        if conversational and getattr(tokenizer, "chat_template", None) is None:  # before the model loads
            raise SettingsError(
                f"The rows are chat messages, but the reward model's tokenizer ({path}, `reward_model`) has no chat "
                "template to render them as it was trained. Set `chat_template` in its tokenizer_config.json (the "
                "template it was trained with), or score plain-text rows."
            )
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            cuda = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            dtype = "bfloat16" if cuda else "float32"
        self.dtype = dtype
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=getattr(torch, dtype), output_loading_info=True, **kwargs
        )
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise SettingsError(
                f"The reward model {path} (`reward_model`) lacks the weights {missing[:5]}{' ...' if len(missing) > 5 else ''}: they "
                "would be random. Pass a trained sequence-classification reward model."
            )
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise SettingsError(f"The reward model's tokenizer ({path}, `reward_model`) has neither a pad nor an EOS "
                                    "token: give it one (`tokenizer.pad_token = ...`, saved with the model).")
            tokenizer.pad_token = tokenizer.eos_token
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length if max_length is not None else self._default_max_length()
        self.sequences = 0
        self.truncated = 0
        self.__name__ = f"reward_model:{path}"

    def _default_max_length(self) -> int | None:
        limit = self.tokenizer.model_max_length
        if isinstance(limit, int) and 0 < limit < 1_000_000:  # unset: transformers' VERY_LARGE_INTEGER
            return limit
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    def describe(self) -> dict:
        return {"path": self.path, "dtype": self.dtype, "device": str(self.device), "batch_size": self.batch_size,
                "max_length": self.max_length, "sequences": self.sequences, "truncated_sequences": self.truncated}

    def token_ids(self, prompt, completion, tools=None, chat_template_kwargs=None) -> list[int]:
        """The reward model's input ids of one (prompt, completion), before truncation."""
        import json

        from trl.data_utils import _tokenize, is_conversational

        if is_conversational({"prompt": prompt}):
            if isinstance(completion, str):
                raise TypeError("a conversational prompt needs a conversational completion (a list of messages), got "
                                "a string")
            tools = json.loads(tools) if isinstance(tools, str) else tools
            kwargs = {"tools": tools, **(chat_template_kwargs or {})}
            return list(_tokenize(self.tokenizer, list(prompt) + list(completion), **kwargs)["input_ids"])
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise TypeError(f"a standard row needs a string prompt and completion, got {type(prompt).__name__} and "
                            f"{type(completion).__name__}")
        text = prompt + completion
        eos = self.tokenizer.eos_token
        if eos and not text.endswith(eos):
            text += eos
        return list(self.tokenizer(text)["input_ids"])

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        import torch

        tools = columns.get("tools") or [None] * len(prompts)
        template_kwargs = columns.get("chat_template_kwargs") or [None] * len(prompts)
        ids = [self.token_ids(p, c, t, k) for p, c, t, k in zip(prompts, completions, tools, template_kwargs,
                                                                  strict=True)]
        if self.max_length is not None:
            # The head reads the last token: the end is kept (a cut end scored a prefix, often the prompt alone, the
            # same for every completion of it)
            for j, seq in enumerate(ids):
                if len(seq) > self.max_length:
                    ids[j] = seq[-self.max_length:]
                    self.truncated += 1
        self.sequences += len(ids)
        order = sorted(range(len(ids)), key=lambda j: -len(ids[j]))
        rewards: list[float] = [0.0] * len(ids)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = max(len(ids[j]) for j in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, j in enumerate(batch):
                input_ids[row, :len(ids[j])] = torch.tensor(ids[j], dtype=torch.long)
                attention_mask[row, :len(ids[j])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(self.device),
                                    attention_mask=attention_mask.to(self.device)).logits
            for j, value in zip(batch, logits[:, 0].float().tolist(), strict=True):
                rewards[j] = value
        return rewards


def load_sources(reward_model: str | None = None, reward_funcs=(), *, revision: str = "main", batch_size: int = 8,
                 max_length: int | None = None, dtype: str = "auto", trust_remote_code: bool = False,
                 conversational: bool = False) -> dict:
    """`{name: source}` in source order: the reward model (named `reward_model:PATH`) first, then each reward
    function (named by its spec; a repeated spec gets `#2`, `#3`). Functions are imported before the model loads.
    `conversational`: the rows are chat messages, which the reward model's tokenizer must have a chat template for."""
    from .combine import _named

    funcs = [(str(spec).strip(), load_reward_function(spec)) for spec in reward_funcs]
    if reward_model is not None:
        scorer = RewardModelScorer(reward_model, revision=revision, batch_size=batch_size, max_length=max_length,
                                   dtype=dtype, trust_remote_code=trust_remote_code, conversational=conversational)
        funcs.insert(0, (scorer.__name__, scorer))
    return _named(funcs)
