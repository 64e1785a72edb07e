"""What the experiments share: environment, seeding, the rated data, log-likelihoods, models, SFT and trainers.

Heavy libraries (torch, transformers, trl, nca_trl) are imported inside the functions, after the environment below is
set, so that `--help` is fast and the offline / quiet settings apply before they load."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("ACCELERATE_DISABLE_RICH", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[2]
VICUNA = REPO / "data" / "vicuna_rated.jsonl"
# Anthropic HH pairs: the first 202 rows ship in tests/data (the identity experiment reads at most the first 64 lines,
# the same in both copies); a checkout with `../shared` beside it reads that full copy
_HH_SHARED = REPO.parent / "shared" / "data" / "hh_helpful_test.jsonl"
HH = _HH_SHARED if _HH_SHARED.exists() else REPO / "tests" / "data" / "hh_helpful_test.jsonl"
METHODS = ("DPO", "InfoNCA", "NCA")


# ----------------------------------------------------------------------------------------------------- run setup
def seed_everything(seed: int):
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet_libraries():
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    for name in ("trl", "accelerate", "nca_trl", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def mean_std(values):
    values = [float(v) for v in values]
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": m, "std": s, "values": values}


# ----------------------------------------------------------------------------------------------------- data
def load_vicuna():
    rows = [json.loads(line) for line in VICUNA.read_text().splitlines() if line.strip()]
    return rows


def vicuna_prompt(question):
    return f"Question: {question}\nAnswer:"


def vicuna_completion(text):
    return " " + text.strip()


def best_worst(rewards):
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))  # first argmax
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))  # first argmin
    return best, worst


def tokenize_pairs(tokenizer, prompt, completions):
    """prompt_ids and completion_ids exactly as the trainers tokenize them (EOS appended, common-prefix split)."""
    from nca_trl.data.tokenize import tokenize_rated_example

    ex = {"prompt": prompt, "completions": completions, "rewards": [0.0] * len(completions)}
    out = tokenize_rated_example(ex, tokenizer, tokenizer.eos_token)
    return out["prompt_ids"], out["completion_ids"]


def sequence_logps(model, tokenizer, items, max_length, batch_size=16):
    """Summed log-probs of each completion given its prompt, truncated like the trainers (`keep_start`).

    `items` is a list of (prompt_ids, completion_ids). Returns a list of floats."""
    import torch
    import torch.nn.functional as F

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            seqs = [(p + c)[:max_length] for p, c in chunk]
            masks = [([0] * len(p) + [1] * len(c))[:max_length] for p, c in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            cmask = torch.tensor([m + [0] * (width - len(m)) for m in masks], dtype=torch.float32)
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
            logp = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:].unsqueeze(2)).squeeze(2)
            out.extend((logp * cmask[:, 1:]).sum(dim=1).tolist())
    if was_training:
        model.train()
    return out


# ----------------------------------------------------------------------------------------------------- models
def build_model(out_dir, tok, seed, size, max_position_embeddings):
    """A random Mistral-architecture model over `tok`'s vocabulary (the config `nca_trl.tiny` builds, smaller vocab)."""
    import torch
    from transformers import AutoModelForCausalLM

    from nca_trl.tiny import model_config

    config = model_config(tok, "mistral", tuple(size), max_position_embeddings)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)


def save_tokenizer(core, out_dir):
    """`nca_trl.tiny.save_tokenizer`: Mistral's special tokens and BOS rule on a `tokenizers.Tokenizer`, saved and
    loaded back (imported here, after the environment above is set)."""
    from nca_trl.tiny import save_tokenizer as save

    return save(core, out_dir)


# ----------------------------------------------------------------------------------------------------- trainers
def silence(trainer):
    """Drop the callback that prints every log dict to stdout (`disable_tqdm=True` installs it)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def trainer_args(config_cls, out_dir, seed, **kwargs):
    """A CPU training config: fp32, no checkpointing, no saving, no reporting, deterministic seed."""
    defaults = dict(
        output_dir=str(out_dir),
        report_to="none",
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        disable_tqdm=True,
        seed=seed,
        data_seed=seed,
    )
    defaults.update(kwargs)
    return config_cls(**defaults)


def sft(model, tok, data, seed, run_dir, out_dir, steps, batch_size, lr, max_length):
    """`trl.SFTTrainer` on `data` (prompt / completion dicts) for `steps` steps; the model and tokenizer are saved to
    `out_dir`. Returns the trained trainer (its model and log history)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = trainer_args(
        SFTConfig,
        run_dir,
        seed,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        max_length=max_length,
        logging_steps=max(1, steps // 10),
    )
    trainer = silence(SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tok))
    trainer.train()
    trainer.save_model(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return trainer


def make_pref_trainer(method, model_path, tok, cfg, seed, out_dir, rated_rows, callbacks):
    """DPO on best-vs-worst pairs, InfoNCA / NCA on all K rated completions; identical optimisation settings."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from nca_trl import InfoNCAConfig, InfoNCATrainer, NCAConfig, NCATrainer

    common = dict(
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch_size"],
        learning_rate=cfg["lr"],
        beta=cfg["beta"],
        max_length=cfg["max_length"],
        logging_steps=max(1, cfg["steps"] // 20),
    )
    if method == "DPO":
        pairs = []
        for r in rated_rows:
            b, w = best_worst(r["rewards"])
            pairs.append({"prompt": r["prompt"], "chosen": r["completions"][b], "rejected": r["completions"][w]})
        args = trainer_args(DPOConfig, out_dir, seed, loss_type=["sigmoid"], **common)
        trainer_cls, ds = DPOTrainer, Dataset.from_list(pairs)
    else:
        config_cls, trainer_cls = {"InfoNCA": (InfoNCAConfig, InfoNCATrainer), "NCA": (NCAConfig, NCATrainer)}[method]
        args = trainer_args(config_cls, out_dir, seed, alpha=cfg["alpha"], **common)
        ds = Dataset.from_list(
            [{"prompt": r["prompt"], "completions": r["completions"], "rewards": r["rewards"]} for r in rated_rows]
        )
    seed_everything(seed)
    return silence(
        trainer_cls(model=model_path, args=args, train_dataset=ds, processing_class=tok, callbacks=callbacks)
    )


def train_metric_history(trainer):
    keep = ("loss", "logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/margins")
    return [{k: h[k] for k in ("step", *keep) if k in h} for h in trainer.state.log_history if "loss" in h]
