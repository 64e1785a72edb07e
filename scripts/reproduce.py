#!/usr/bin/env python
"""Reproduce the NCA paper's claims at small scale on a CPU, with plots, from one command.

Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards" (NeurIPS 2024). Three experiments:

1. `identity`: InfoNCA with K=2 and one-hot targets (alpha=0) is DPO. Per-example losses and gradients of
   `nca_trl.losses.infonca_loss` vs `-log sigmoid(beta * (l_c - l_r))` on log-ratios of a real model on real pairs,
   and at trainer level `InfoNCATrainer(alpha=0).compute_loss` vs `trl.DPOTrainer(loss_type=["sigmoid"])` on the same
   batch with an explicit reference model of another seed (gradients w.r.t. every parameter compared).
2. `trend`: the likelihood trend. A small Mistral-architecture model is first fine-tuned with `trl.SFTTrainer` on the
   completions of the real rated data (`data/vicuna_rated.jsonl`), then DPO (best-vs-worst pairs), InfoNCA and NCA
   (all K=4) are trained from that checkpoint with the same steps, learning rate, beta and batch, and the mean
   log-likelihood of the chosen (best) and rejected (worst) completions of held-out prompts and of fixed training
   prompts is measured every few steps. Tokenizer: a 2k-token byte-level BPE trained on the training texts (default;
   with the 32k-token Mistral tokenizer the LM head dominates and a run is ~10x slower:
   `--set trend.tokenizer=mistral`).
3. `reward`: a ground-truth reward task (sorting digits, partial credit per correct position; character-level
   tokenizer). SFT on a few correct demonstrations, sample K=4 completions per training prompt, score them exactly,
   train DPO on best-vs-worst and InfoNCA / NCA on all four, evaluate greedy outputs on held-out prompts; at the main
   (lr, beta) and over a small (lr, beta) grid.

Everything runs through the real trainers (`trl.SFTTrainer`, `trl.DPOTrainer`, `nca_trl.InfoNCATrainer`,
`nca_trl.NCATrainer`). Outputs in `--out`: `results.json` (every number and setting), `likelihood_trend.png` (main
lr) and `likelihood_trend_lr*.png` (the other lrs), `ground_truth_reward.png`, `ground_truth_sensitivity.png`,
`summary.md` (the tables). Seeded throughout: the same command gives the same numbers.

```bash
python scripts/reproduce.py --out results/            # all three experiments, ~11 min on 2 busy CPU cores
python scripts/reproduce.py --out /tmp/r --quick      # smoke run, about a minute
python scripts/reproduce.py --out results/ --experiments trend reward
```
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("ACCELERATE_DISABLE_RICH", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without (or with a stale) editable install
    sys.path.insert(0, str(REPO))
VICUNA = REPO / "data" / "vicuna_rated.jsonl"
HH = REPO.parent / "shared" / "data" / "hh_helpful_test.jsonl"
METHODS = ("DPO", "InfoNCA", "NCA")
COLORS = {"SFT": "#7f7f7f", "DPO": "#1f77b4", "InfoNCA": "#ff7f0e", "NCA": "#2ca02c"}

# ----------------------------------------------------------------------------------------------------- settings
# Every knob of every experiment; `--quick` swaps in QUICK. Both are written to results.json.
FULL = {
    "seeds": [0, 1, 2],
    "identity": {
        "num_pairs": 16,
        "betas": [0.01, 0.1, 1.0],
        "model_size": [64, 128, 2, 4, 2],
        "max_length": 192,
    },
    "trend": {
        "tokenizer": "bpe",  # or "mistral" (real Mistral-7B tokenizer, 32k vocab: ~10x slower on a CPU)
        "bpe_vocab_size": 2048,
        # hidden, intermediate, layers, heads, kv heads
        "model_size": [128, 256, 2, 4, 2],
        "max_length": 128,
        "num_heldout": 16,
        "sft_epochs": 8,
        "sft_batch_size": 16,
        "sft_lr": 3e-3,
        "steps": 60,
        "batch_size": 4,
        "lr": 5e-4,  # the setting of the main figure; every lr of grid_lr is run (same SFT checkpoint)
        "grid_lr": [1e-4, 5e-4],
        "beta": 0.01,
        "alpha": 0.0,
        "eval_every": 5,
    },
    "reward": {
        "num_digits": 5,
        "model_size": [128, 256, 2, 4, 2],
        "num_demos": 128,
        "sft_steps": 100,
        "sft_batch_size": 32,
        "sft_lr": 3e-3,
        "num_train_prompts": 512,
        "k": 4,
        "sample_temperature": 1.0,
        "num_heldout": 500,
        "steps": 100,
        "batch_size": 16,
        "lr": 1e-4,
        "beta": 0.1,
        "alpha": 0.1,
        # sensitivity: every method is also trained at each of these (lr, beta), same SFT model and samples
        "grid": {"lr": [1e-4, 5e-4], "beta": [0.01, 0.1, 1.0]},
    },
}
QUICK = {
    "seeds": [0],
    "identity": {"num_pairs": 4, "betas": [0.1], "model_size": [32, 64, 1, 2, 1], "max_length": 96},
    "trend": {
        **FULL["trend"],
        "model_size": [32, 64, 1, 2, 1],
        "max_length": 48,
        "num_heldout": 4,
        "sft_epochs": 1,
        "steps": 4,
        "batch_size": 2,
        "eval_every": 2,
        "grid_lr": [5e-4],
    },
    "reward": {
        **FULL["reward"],
        "model_size": [32, 64, 1, 2, 1],
        "num_demos": 64,
        "sft_steps": 20,
        "num_train_prompts": 32,
        "num_heldout": 50,
        "steps": 4,
        "batch_size": 8,
        "grid": {"lr": [1e-4], "beta": [0.1]},
    },
}

log = logging.getLogger("reproduce")


# ----------------------------------------------------------------------------------------------------- helpers
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


def mean_std(values):
    values = [float(v) for v in values]
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": m, "std": s, "values": values}


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


# ----------------------------------------------------------------------------------------------------- 1. identity
def real_pairs(source, n):
    """n real (prompt, chosen, rejected) pairs: vicuna best-vs-worst (repo data) or Anthropic HH (optional)."""
    if source == "vicuna":
        pairs = []
        for row in load_vicuna():
            r = row["rewards"]
            if max(r) == min(r):
                continue
            b, w = best_worst(r)
            pairs.append(
                {
                    "prompt": vicuna_prompt(row["prompt"]),
                    "chosen": vicuna_completion(row["completions"][b]),
                    "rejected": vicuna_completion(row["completions"][w]),
                }
            )
        return pairs[:n]
    rows = [json.loads(line) for line in HH.read_text().splitlines()[: 4 * n] if line.strip()]
    rows = [r for r in rows if r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]]
    rows.sort(key=lambda r: len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])))  # short ones: no truncation
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows[:n]]


def flat_grads(model):
    import torch

    return torch.cat(
        [p.grad.detach().flatten() if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()]
    )


def run_identity(cfg, seeds, work):
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from nca_trl import InfoNCAConfig, InfoNCATrainer
    from nca_trl.losses import infonca_loss
    from nca_trl.tiny import build_tiny_model

    seed = seeds[0]
    size = tuple(cfg["model_size"])
    policy_path = build_tiny_model(work / "identity-policy", seed=seed, size=size)
    ref_path = build_tiny_model(work / "identity-ref", seed=seed + 1000, size=size)
    tok = AutoTokenizer.from_pretrained(policy_path)
    tok.pad_token = tok.pad_token or tok.eos_token
    sources = ["vicuna"] + (["hh"] if HH.exists() else [])
    result = {"sources": sources, "policy_seed": seed, "reference_seed": seed + 1000}

    for source in sources:
        pairs = real_pairs(source, cfg["num_pairs"])
        res = {"num_pairs": len(pairs), "loss_level": {}, "trainer_level": {}}

        # Loss level: log-ratios of a real model on real pairs, per example
        policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32)
        items = []
        for p in pairs:
            prompt_ids, (c_ids, r_ids) = tokenize_pairs(tok, p["prompt"], [p["chosen"], p["rejected"]])
            items += [(prompt_ids, c_ids), (prompt_ids, r_ids)]
        pol = torch.tensor(sequence_logps(policy, tok, items, cfg["max_length"]))
        rf = torch.tensor(sequence_logps(ref, tok, items, cfg["max_length"]))
        logratios = (pol - rf).view(-1, 2)
        res["logratio_abs_mean"] = float(logratios.abs().mean())
        for beta in cfg["betas"]:
            lr1 = logratios.clone().requires_grad_(True)
            lr2 = logratios.clone().requires_grad_(True)
            ours = infonca_loss(lr1, torch.tensor([[1.0, 0.0]]).expand(len(pairs), 2), beta=beta, alpha=0.0)
            dpo = -F.logsigmoid(beta * (lr2[:, 0] - lr2[:, 1]))
            ours.sum().backward()  # per-example gradients: each loss depends only on its own row
            dpo.sum().backward()
            res["loss_level"][str(beta)] = {
                "losses_infonca": ours.tolist(),
                "losses_dpo": dpo.tolist(),
                "max_abs_loss_diff": float((ours - dpo).abs().max()),
                "max_abs_grad_diff": float((lr1.grad - lr2.grad).abs().max()),
                "max_abs_grad": float(lr2.grad.abs().max()),
            }

        # Trainer level: one example at a time through `compute_loss` of both trainers, explicit reference model
        # (another seed). Two layouts of the nca_trl batch: the plain padded one (`shared_prompt=False`, the same
        # tensors as DPOTrainer's [chosen, rejected] batch) and the default shared-prompt packing (the prompt once, its
        # completions after it), which sums the same float32 token log-probs in another order.
        beta = 0.1
        ds = Dataset.from_list(pairs)
        res["trainer_level"] = {}
        for layout, shared_prompt in (("padded", False), ("shared_prompt", True)):
            trainers = {}
            for name, trainer_cls, config_cls, extra in (
                ("DPO", DPOTrainer, DPOConfig, {"loss_type": ["sigmoid"]}),
                ("InfoNCA", InfoNCATrainer, InfoNCAConfig, {"alpha": 0.0, "shared_prompt": shared_prompt}),
            ):
                args = trainer_args(
                    config_cls, work / f"identity-{name}", seed, per_device_train_batch_size=1,
                    max_length=cfg["max_length"], beta=beta, **extra,
                )
                trainers[name] = trainer_cls(
                    model=AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32),
                    ref_model=AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32),
                    args=args,
                    train_dataset=ds,
                    processing_class=tok,
                )
            dpo_t, nca_t = trainers["DPO"], trainers["InfoNCA"]
            assert len(dpo_t.train_dataset) == len(nca_t.train_dataset) == len(pairs)
            per_example = []
            for i in range(len(pairs)):
                d_row, n_row = dpo_t.train_dataset[i], nca_t.train_dataset[i]
                assert d_row["prompt_ids"] == n_row["prompt_ids"]
                assert [d_row["chosen_ids"], d_row["rejected_ids"]] == n_row["completion_ids"]
                values = {}
                for name, trainer, row_keys in (
                    ("DPO", dpo_t, ("prompt_ids", "chosen_ids", "rejected_ids")),
                    ("InfoNCA", nca_t, ("prompt_ids", "completion_ids", "rewards")),
                ):
                    batch = trainer.data_collator([{k: trainer.train_dataset[i][k] for k in row_keys}])
                    inputs = trainer._prepare_inputs(batch)
                    trainer.model.train()
                    trainer.model.zero_grad(set_to_none=True)
                    loss = trainer.compute_loss(trainer.model, inputs)
                    loss.backward()
                    values[name] = (float(loss.detach()), flat_grads(trainer.model))
                (ld, gd), (ln, gn) = values["DPO"], values["InfoNCA"]
                per_example.append(
                    {
                        "loss_dpo": ld,
                        "loss_infonca": ln,
                        "abs_loss_diff": abs(ld - ln),
                        "max_abs_grad_diff": float((gd - gn).abs().max()),
                        "max_abs_grad": float(gd.abs().max()),
                        "grad_norm": float(gd.norm()),
                    }
                )
            res["trainer_level"][layout] = {
                "beta": beta,
                "per_example": per_example,
                "max_abs_loss_diff": max(e["abs_loss_diff"] for e in per_example),
                "max_abs_grad_diff": max(e["max_abs_grad_diff"] for e in per_example),
                "max_rel_grad_diff": max(e["max_abs_grad_diff"] / max(e["max_abs_grad"], 1e-30) for e in per_example),
                "num_parameters": int(sum(p.numel() for p in dpo_t.model.parameters())),
            }
            del trainers, dpo_t, nca_t
        ll = max(v["max_abs_loss_diff"] for v in res["loss_level"].values())
        lg = max(v["max_abs_grad_diff"] for v in res["loss_level"].values())
        msg = ", ".join(
            f"{k}: max |dloss| {t['max_abs_loss_diff']:.1e}, max |dgrad| {t['max_abs_grad_diff']:.1e} "
            f"(rel {t['max_rel_grad_diff']:.1e})"
            for k, t in res["trainer_level"].items()
        )
        print(
            f"[identity/{source}] {len(pairs)} pairs | loss level: max |dloss| {ll:.1e}, max |dgrad| {lg:.1e} | "
            f"trainer level (beta {beta}, {res['trainer_level']['padded']['num_parameters']} params) {msg}",
            flush=True,
        )
        result[source] = res
    return result


# ----------------------------------------------------------------------------------------------------- 2. trend
def trend_split(cfg):
    """Held-out prompts (distinct rewards) and training prompts; deterministic, independent of the run seed."""
    rows = load_vicuna()
    distinct = [i for i, r in enumerate(rows) if max(r["rewards"]) > min(r["rewards"])]
    rng = random.Random(1234)
    heldout = sorted(rng.sample(distinct, cfg["num_heldout"]))
    train_all = [i for i in range(len(rows)) if i not in set(heldout)]  # SFT uses all their completions
    train_pref = [i for i in train_all if i in set(distinct)]  # preference training: prompts with a preference
    return rows, heldout, train_all, train_pref


class LikelihoodProbe:
    """Mean summed log-likelihood of fixed chosen / rejected completions, at step 0 and every `every` steps.

    `sets` maps a name ("train", "heldout") to a list of ((prompt_ids, chosen_ids), (prompt_ids, rejected_ids))."""

    def __init__(self, tokenizer, sets, max_length, every):
        from transformers import TrainerCallback

        self.sets, self.tok, self.max_length, self.every = sets, tokenizer, max_length, every
        self.steps = []
        self.curves = {name: {"chosen": [], "rejected": []} for name in sets}
        outer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                outer.record(model, 0)

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % outer.every == 0 or state.global_step == state.max_steps:
                    outer.record(model, state.global_step)

        self.callback = _Callback()

    def record(self, model, step):
        if self.steps and self.steps[-1] == step:
            return
        self.steps.append(step)
        for name, items in self.sets.items():
            logps = sequence_logps(model, self.tok, [it for pair in items for it in pair], self.max_length)
            self.curves[name]["chosen"].append(sum(logps[0::2]) / len(items))
            self.curves[name]["rejected"].append(sum(logps[1::2]) / len(items))


def build_bpe_tokenizer(out_dir, texts, vocab_size):
    """A byte-level BPE tokenizer trained on `texts` (deterministic), with Mistral's special tokens and BOS rule."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def sft_trend_model(cfg, seed, work, rows, train_all):
    """Random small Mistral-architecture model fine-tuned with trl.SFTTrainer on the completions of the train prompts.

    Tokenizer: `cfg["tokenizer"]` = "bpe" (default: a 2k-token byte-level BPE trained on the training prompts and
    completions, so that the model's compute goes into the transformer rather than a 32k-row LM head) or "mistral"
    (the real Mistral-7B tokenizer via `nca_trl.tiny`, ~10x slower on a CPU)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from nca_trl.tiny import build_tiny_model

    init_dir = work / f"trend-init-{seed}"
    if cfg["tokenizer"] == "mistral":
        init = build_tiny_model(init_dir, seed=seed, size=tuple(cfg["model_size"]))
        tok = AutoTokenizer.from_pretrained(init)
    else:
        texts = [vicuna_prompt(rows[i]["prompt"]) for i in train_all]
        texts += [vicuna_completion(c) for i in train_all for c in rows[i]["completions"]]
        tok = build_bpe_tokenizer(init_dir, texts, cfg["bpe_vocab_size"])
        init = build_model(init_dir, tok, seed, tuple(cfg["model_size"]), 4096)
    data = [
        {"prompt": vicuna_prompt(rows[i]["prompt"]), "completion": vicuna_completion(c)}
        for i in train_all
        for c in rows[i]["completions"]
    ]
    ds = Dataset.from_list(data)
    steps = max(1, cfg["sft_epochs"] * len(data) // cfg["sft_batch_size"])
    args = trainer_args(
        SFTConfig,
        work / f"trend-sft-{seed}-run",
        seed,
        max_steps=steps,
        per_device_train_batch_size=cfg["sft_batch_size"],
        learning_rate=cfg["sft_lr"],
        max_length=cfg["max_length"],
        logging_steps=max(1, steps // 10),
    )
    trainer = silence(SFTTrainer(model=init, args=args, train_dataset=ds, processing_class=tok))
    trainer.train()
    out = work / f"trend-sft-{seed}"
    trainer.save_model(str(out))
    tok.save_pretrained(str(out))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return str(out), {"steps": steps, "num_sequences": len(data), "loss_first": losses[0], "loss_last": losses[-1]}


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


def run_trend(cfg, seeds, work):
    from transformers import AutoTokenizer

    rows, heldout, train_all, train_pref = trend_split(cfg)
    probe_train = sorted(random.Random(4321).sample(train_pref, min(cfg["num_heldout"], len(train_pref))))
    result = {
        "chosen": "highest-reward completion (first on ties)",
        "rejected": "lowest-reward completion (first on ties)",
        "heldout_prompt_ids": [rows[i]["id"] for i in heldout],
        "probe_train_prompt_ids": [rows[i]["id"] for i in probe_train],
        "num_sft_prompts": len(train_all),
        "num_pref_prompts": len(train_pref),
        "main_lr": lr_key(cfg["lr"]),
        "by_lr": {lr_key(lr): {"lr": lr, "runs": {m: {} for m in METHODS}} for lr in cfg["grid_lr"]},
        "sft": {},
    }
    if lr_key(cfg["lr"]) not in result["by_lr"]:
        raise ValueError("trend.lr must be one of trend.grid_lr")
    for seed in seeds:
        t0 = time.time()
        sft_path, sft_info = sft_trend_model(cfg, seed, work, rows, train_all)
        tok = AutoTokenizer.from_pretrained(sft_path)

        def pairs_of(indices):
            items = []
            for i in indices:
                b, w = best_worst(rows[i]["rewards"])
                prompt_ids, (c_ids, r_ids) = tokenize_pairs(
                    tok,
                    vicuna_prompt(rows[i]["prompt"]),
                    [vicuna_completion(rows[i]["completions"][b]), vicuna_completion(rows[i]["completions"][w])],
                )
                items.append(((prompt_ids, c_ids), (prompt_ids, r_ids)))
            return items

        sets = {"train": pairs_of(probe_train), "heldout": pairs_of(heldout)}
        rated = [
            {
                "prompt": vicuna_prompt(rows[i]["prompt"]),
                "completions": [vicuna_completion(c) for c in rows[i]["completions"]],
                "rewards": [float(x) for x in rows[i]["rewards"]],
            }
            for i in train_pref
        ]
        sft_info["seconds"] = time.time() - t0
        result["sft"][str(seed)] = sft_info
        print(f"[trend] seed {seed}: SFT {sft_info['steps']} steps, loss {sft_info['loss_first']:.2f} -> "
              f"{sft_info['loss_last']:.2f} ({sft_info['seconds']:.0f}s)", flush=True)
        for lr, method in ((lr, method) for lr in cfg["grid_lr"] for method in METHODS):
            t0 = time.time()
            probe = LikelihoodProbe(tok, sets, cfg["max_length"], cfg["eval_every"])
            trainer = make_pref_trainer(
                method, sft_path, tok, {**cfg, "lr": lr}, seed, work / f"trend-{method}-{seed}", rated,
                [probe.callback],
            )
            trainer.train()
            probe.record(trainer.model, trainer.state.global_step)
            run = {"steps": probe.steps, **probe.curves}
            for name, curve in probe.curves.items():
                for key in ("chosen", "rejected"):
                    run[f"{name}_{key}_change"] = curve[key][-1] - curve[key][0]
            run["train_log"] = train_metric_history(trainer)
            run["seconds"] = time.time() - t0
            result["by_lr"][lr_key(lr)]["runs"][method][str(seed)] = run
            print(
                f"[trend] seed {seed} lr {lr:g} {method:8s}: log-likelihood change chosen / rejected: held-out "
                f"{run['heldout_chosen_change']:+8.2f} / {run['heldout_rejected_change']:+8.2f}, train prompts "
                f"{run['train_chosen_change']:+8.2f} / {run['train_rejected_change']:+8.2f} "
                f"(held-out chosen at start {probe.curves['heldout']['chosen'][0]:.1f}) [{run['seconds']:.0f}s]",
                flush=True,
            )
            del trainer
    for entry in result["by_lr"].values():
        entry["summary"] = {
            m: {
                f"{name}_{key}_change": mean_std([entry["runs"][m][str(s)][f"{name}_{key}_change"] for s in seeds])
                for name in ("heldout", "train")
                for key in ("chosen", "rejected")
            }
            for m in METHODS
        }
    return result


def lr_key(lr):
    return f"lr={lr:g}"


# ----------------------------------------------------------------------------------------------------- 3. reward
CHAR_VOCAB = list("0123456789>")


def build_char_tokenizer(out_dir):
    """A character-level tokenizer (digits, '>', BOS/EOS) in the HF format the trainers take as processing_class."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *CHAR_VOCAB])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )
    tok.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


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


def build_char_model(out_dir, seed, size):
    return build_model(out_dir, build_char_tokenizer(out_dir), seed, size, 64)


def sort_task(rng, n):
    digits = [rng.randrange(10) for _ in range(n)]
    return "".join(map(str, digits)) + ">", "".join(map(str, sorted(digits)))


def true_reward(output, target):
    """Fraction of positions right; a missing or extra character counts as wrong (length mismatch is penalised)."""
    right = sum(a == b for a, b in zip(output, target))
    return right / max(len(target), len(output))


def generate(model, tok, prompts, num_digits, do_sample, num_return_sequences=1, batch_size=256):
    import torch

    model.eval()
    tok.padding_side = "left"
    outs = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tok(chunk, return_tensors="pt", padding=True)
            gen = model.generate(
                **enc,
                max_new_tokens=num_digits + 2,
                do_sample=do_sample,
                temperature=1.0 if do_sample else None,
                top_k=0 if do_sample else None,
                top_p=1.0 if do_sample else None,
                num_return_sequences=num_return_sequences,
                pad_token_id=tok.eos_token_id,
                eos_token_id=tok.eos_token_id,
            )
            outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    tok.padding_side = "right"
    return outs


def evaluate_greedy(model, tok, tasks, num_digits):
    outs = generate(model, tok, [p for p, _ in tasks], num_digits, do_sample=False)
    rewards = [true_reward(o, t) for o, (_, t) in zip(outs, tasks)]
    exact = [float(o == t) for o, (_, t) in zip(outs, tasks)]
    return {"reward": sum(rewards) / len(rewards), "exact_match": sum(exact) / len(exact), "examples": outs[:5]}


def run_reward(cfg, seeds, work):
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    n = cfg["num_digits"]
    if cfg["lr"] not in cfg["grid"]["lr"] or cfg["beta"] not in cfg["grid"]["beta"]:
        raise ValueError("the main setting (reward.lr, reward.beta) must be part of reward.grid")
    heldout_rng = random.Random(10_000)
    heldout = []
    while len(heldout) < cfg["num_heldout"]:
        t = sort_task(heldout_rng, n)
        if t not in heldout:
            heldout.append(t)
    heldout_prompts = {p for p, _ in heldout}
    result = {"task": f"sort {n} digits; reward = fraction of output positions right", "per_seed": {}}

    for seed in seeds:
        t0 = time.time()
        rng = random.Random(seed)

        def fresh(k):
            tasks = []
            while len(tasks) < k:
                t = sort_task(rng, n)
                if t[0] not in heldout_prompts:
                    tasks.append(t)
            return tasks

        demos, train_tasks = fresh(cfg["num_demos"]), fresh(cfg["num_train_prompts"])
        init = build_char_model(work / f"reward-init-{seed}", seed, tuple(cfg["model_size"]))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(init)
        seed_everything(seed)
        sft_args = trainer_args(
            SFTConfig,
            work / f"reward-sft-{seed}-run",
            seed,
            max_steps=cfg["sft_steps"],
            per_device_train_batch_size=cfg["sft_batch_size"],
            learning_rate=cfg["sft_lr"],
            max_length=32,
            logging_steps=max(1, cfg["sft_steps"] // 10),
        )
        sft = silence(
            SFTTrainer(
                model=init,
                args=sft_args,
                train_dataset=Dataset.from_list([{"prompt": p, "completion": c} for p, c in demos]),
                processing_class=tok,
            )
        )
        sft.train()
        sft_path = str(work / f"reward-sft-{seed}")
        sft.save_model(sft_path)
        tok.save_pretrained(sft_path)
        model = sft.model
        res = {"SFT": evaluate_greedy(model, tok, heldout, n)}

        # K samples per training prompt from the SFT policy, scored with the true reward
        torch.manual_seed(seed)
        k = cfg["k"]
        samples = generate(model, tok, [p for p, _ in train_tasks], n, do_sample=True, num_return_sequences=k)
        rated, all_equal, empty = [], 0, 0
        for j, (p, target) in enumerate(train_tasks):
            comps = samples[j * k : (j + 1) * k]
            rewards = [true_reward(c, target) for c in comps]
            if any(c == "" for c in comps):  # an immediate EOS: an empty completion cannot be trained on
                empty += 1
                continue
            if max(rewards) == min(rewards):  # no preference: DPO has no pair, so it is left out for every method
                all_equal += 1
                continue
            rated.append({"prompt": p, "completions": comps, "rewards": rewards})
        flat_rewards = [r for row in rated for r in row["rewards"]]
        res["samples"] = {
            "num_prompts": len(train_tasks),
            "num_used": len(rated),
            "num_all_equal_dropped": all_equal,
            "num_with_empty_dropped": empty,
            "mean_sample_reward": sum(flat_rewards) / max(1, len(flat_rewards)),
            "mean_best_reward": sum(max(r["rewards"]) for r in rated) / max(1, len(rated)),
            "mean_worst_reward": sum(min(r["rewards"]) for r in rated) / max(1, len(rated)),
        }
        del sft, model

        # Every (lr, beta) of the grid, each method from the same SFT checkpoint and the same samples; the main
        # setting (cfg["lr"], cfg["beta"]) is one of them
        res["grid"] = {}
        for lr in cfg["grid"]["lr"]:
            for beta in cfg["grid"]["beta"]:
                key = setting_key(lr, beta)
                res["grid"][key] = {}
                for method in METHODS:
                    run_cfg = {**cfg, "lr": lr, "beta": beta, "max_length": 32}
                    trainer = make_pref_trainer(
                        method, sft_path, tok, run_cfg, seed, work / f"reward-{method}-{seed}", rated, []
                    )
                    trainer.train()
                    ev = evaluate_greedy(trainer.model, tok, heldout, n)
                    ev["train_log"] = train_metric_history(trainer)
                    res["grid"][key][method] = ev
                    del trainer
        for method in METHODS:
            res[method] = res["grid"][setting_key(cfg["lr"], cfg["beta"])][method]
        res["seconds"] = time.time() - t0
        result["per_seed"][str(seed)] = res
        line = ", ".join(f"{m} {res[m]['reward']:.3f}/{res[m]['exact_match']:.3f}" for m in ("SFT", *METHODS))
        print(f"[reward] seed {seed}: greedy reward/exact on {len(heldout)} held-out prompts: {line} "
              f"({res['samples']['num_used']} rated prompts; {res['seconds']:.0f}s)", flush=True)

    result["summary"] = {
        m: {
            "reward": mean_std([result["per_seed"][str(s)][m]["reward"] for s in seeds]),
            "exact_match": mean_std([result["per_seed"][str(s)][m]["exact_match"] for s in seeds]),
        }
        for m in ("SFT", *METHODS)
    }
    result["main_setting"] = setting_key(cfg["lr"], cfg["beta"])
    # Paired by seed (same SFT model, samples and held-out prompts): the seed-to-seed spread of SFT cancels
    result["paired_difference_vs_DPO"] = {
        key: {
            m: {
                metric: mean_std([
                    result["per_seed"][str(s)]["grid"][key][m][metric]
                    - result["per_seed"][str(s)]["grid"][key]["DPO"][metric]
                    for s in seeds
                ])
                for metric in ("reward", "exact_match")
            }
            for m in ("InfoNCA", "NCA")
        }
        for key in result["per_seed"][str(seeds[0])]["grid"]
    }
    result["grid_summary"] = {
        key: {
            m: {
                metric: mean_std([result["per_seed"][str(s)]["grid"][key][m][metric] for s in seeds])
                for metric in ("reward", "exact_match")
            }
            for m in METHODS
        }
        for key in result["per_seed"][str(seeds[0])]["grid"]
    }
    return result


def setting_key(lr, beta):
    return f"lr={lr:g},beta={beta:g}"


# ----------------------------------------------------------------------------------------------------- plots, tables
def plot_trend(trend, cfg, lr, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    entry = trend["by_lr"][lr_key(lr)]
    sets = (("heldout", "held-out prompts"), ("train", "training prompts"))
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4), sharex=True)
    for row, (name, label) in enumerate(sets):
        for col, method in enumerate(METHODS):
            ax = axes[row, col]
            runs = list(entry["runs"][method].values())
            steps = np.array(runs[0]["steps"])
            for key, style in (("chosen", "-"), ("rejected", "--")):
                vals = np.array([r[name][key] for r in runs])
                m = vals.mean(0)
                s = vals.std(0, ddof=1) if len(runs) > 1 else np.zeros(vals.shape[1])
                ax.plot(steps, m, style, color=COLORS[method], label=key)
                ax.fill_between(steps, m - s, m + s, color=COLORS[method], alpha=0.2)
            ch = entry["summary"][method][f"{name}_chosen_change"]
            ax.set_title(f"{method}, {label}: chosen {ch['mean']:+.0f} ± {ch['std']:.0f}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(loc="lower left", fontsize=8)
            if row == 1:
                ax.set_xlabel("training step")
        axes[row, 0].set_ylabel(f"log-likelihood, {label}\n(nats / sequence)")
        runs = [r for m in METHODS for r in entry["runs"][m].values()]
        values = [v for r in runs for k in ("chosen", "rejected") for v in r[name][k]]
        lo, hi = min(values), max(values)
        pad = 0.05 * (hi - lo + 1e-9)
        for ax in axes[row]:
            ax.set_ylim(lo - pad, hi + pad)
    n = len(entry["runs"]["DPO"])
    fig.suptitle(
        f"Log-likelihood of the chosen (best) and rejected (worst) completions while training from one SFT checkpoint "
        f"(beta={cfg['beta']}, alpha={cfg['alpha']}, lr={lr:g}, batch {cfg['batch_size']} prompts, "
        f"{n} seed(s), mean ± std)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_reward(reward, cfg, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["SFT", *METHODS]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, key, label in zip(axes, ("reward", "exact_match"), ("mean true reward (greedy)", "exact match (greedy)")):
        summ = [reward["summary"][n][key] for n in names]
        ax.bar(names, [s["mean"] for s in summ], yerr=[s["std"] for s in summ], capsize=4,
               color=[COLORS[n] for n in names])
        for i, s in enumerate(summ):
            ax.scatter([i] * len(s["values"]), s["values"], color="k", s=8, zorder=3)
            ax.text(i, s["mean"] + s["std"] + 0.01, f"{s['mean']:.3f}", ha="center", fontsize=8)
        ax.set_ylabel(label)
        lo = min(min(s["values"]) for s in summ)
        ax.set_ylim(max(0.0, lo - 0.1), min(1.05, max(s["mean"] + s["std"] for s in summ) + 0.06))
        ax.grid(axis="y", alpha=0.3)
    n_seeds = len(reward["per_seed"])
    fig.suptitle(
        f"Sorting {cfg['num_digits']} digits, {cfg['num_heldout']} held-out prompts, K={cfg['k']} samples, "
        f"lr={cfg['lr']:g}, beta={cfg['beta']:g}, alpha={cfg['alpha']:g}: mean ± std over {n_seeds} seed(s) "
        "(dots: seeds)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_reward_grid(reward, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(reward["grid_summary"])
    x = np.arange(len(keys))
    width = 0.26
    fig, ax = plt.subplots(figsize=(9, 3.4))
    for j, m in enumerate(METHODS):
        summ = [reward["grid_summary"][k][m]["reward"] for k in keys]
        ax.bar(x + (j - 1) * width, [s["mean"] for s in summ], width, yerr=[s["std"] for s in summ], capsize=3,
               color=COLORS[m], label=m)
    sft = reward["summary"]["SFT"]["reward"]
    ax.axhline(sft["mean"], color=COLORS["SFT"], ls="--", label=f"SFT ({sft['mean']:.3f})")
    ax.set_xticks(x, [k.replace(",", "\n") + ("\n(main)" if k == reward["main_setting"] else "") for k in keys],
                  fontsize=8)
    ax.set_ylabel("mean true reward (greedy)")
    lo = min(reward["grid_summary"][k][m]["reward"]["mean"] for k in keys for m in METHODS)
    ax.set_ylim(max(0.0, min(lo, sft["mean"]) - 0.08), 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    ax.set_title(f"Sorting task: every method at every (lr, beta), same SFT model and samples; mean ± std over "
                 f"{len(reward['per_seed'])} seed(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def summary_markdown(results):
    lines = []
    if "identity" in results:
        lines.append("### Identity: InfoNCA (K=2, alpha=0) vs DPO sigmoid\n")
        lines.append("| data | pairs | loss fn: max abs loss diff | loss fn: max abs grad diff | trainer, padded "
                     "layout: max abs loss diff | padded: max abs param-grad diff (relative) | trainer, shared-prompt "
                     "layout: max abs loss diff | shared-prompt: max abs param-grad diff (relative) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for src in results["identity"]["sources"]:
            r = results["identity"][src]
            ll = max(v["max_abs_loss_diff"] for v in r["loss_level"].values())
            lg = max(v["max_abs_grad_diff"] for v in r["loss_level"].values())
            t, t64 = r["trainer_level"]["padded"], r["trainer_level"]["shared_prompt"]
            lines.append(f"| {src} | {r['num_pairs']} | {ll:.1e} | {lg:.1e} | {t['max_abs_loss_diff']:.1e} | "
                         f"{t['max_abs_grad_diff']:.1e} ({t['max_rel_grad_diff']:.1e}) | "
                         f"{t64['max_abs_loss_diff']:.1e} | "
                         f"{t64['max_abs_grad_diff']:.1e} ({t64['max_rel_grad_diff']:.1e}) |")
        lines.append("")
    if "trend" in results:
        tr = results["trend"]
        lines.append("### Likelihood trend: change of log-likelihood (nats/sequence) from the SFT checkpoint to the "
                     "end of training\n")
        lines.append("| lr | method | held-out chosen | held-out rejected | training-prompt chosen | "
                     "training-prompt rejected | held-out chosen per seed | training-prompt chosen per seed |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for (key, entry), m in ((kv, m) for kv in tr["by_lr"].items() for m in METHODS):
            summ = entry["summary"][m]
            cells = [f"{summ[k]['mean']:+.1f} ± {summ[k]['std']:.1f}" for k in (
                "heldout_chosen_change", "heldout_rejected_change", "train_chosen_change", "train_rejected_change")]
            per_seed = [", ".join(f"{v:+.1f}" for v in summ[k]["values"])
                        for k in ("heldout_chosen_change", "train_chosen_change")]
            main = " (main)" if key == tr["main_lr"] else ""
            lines.append(f"| {entry['lr']:g}{main} | {m} | {' | '.join(cells)} | {' | '.join(per_seed)} |")
        lines.append("")
    if "reward" in results:
        rw = results["reward"]
        lines.append("### Ground-truth reward task (sorting): greedy outputs on held-out prompts\n")
        lines.append("| model | mean true reward | exact match | per-seed reward |")
        lines.append("|---|---|---|---|")
        for m in ("SFT", *METHODS):
            s, e = rw["summary"][m]["reward"], rw["summary"][m]["exact_match"]
            lines.append(f"| {m} | {s['mean']:.3f} ± {s['std']:.3f} | {e['mean']:.3f} ± {e['std']:.3f} | "
                         f"{', '.join(f'{v:.3f}' for v in s['values'])} |")
        lines.append("")
        sft = rw["summary"]["SFT"]
        lines.append("Sensitivity (mean true reward ± std over seeds; exact match in brackets; SFT "
                     f"{sft['reward']['mean']:.3f} [{sft['exact_match']['mean']:.3f}]):\n")
        lines.append("| setting | " + " | ".join(METHODS) + " |")
        lines.append("|---|" + "---|" * len(METHODS))
        for key, by_method in rw["grid_summary"].items():
            cells = [f"{by_method[m]['reward']['mean']:.3f} ± {by_method[m]['reward']['std']:.3f} "
                     f"[{by_method[m]['exact_match']['mean']:.3f}]" for m in METHODS]
            main = " (main)" if key == rw["main_setting"] else ""
            lines.append(f"| {key}{main} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Paired difference to DPO (same seed: same SFT model, samples and held-out prompts), true reward "
                     "[exact match], mean ± std over seeds:\n")
        lines.append("| setting | InfoNCA - DPO | NCA - DPO |")
        lines.append("|---|---|---|")
        for key, by_method in rw["paired_difference_vs_DPO"].items():
            cells = [f"{by_method[m]['reward']['mean']:+.3f} ± {by_method[m]['reward']['std']:.3f} "
                     f"[{by_method[m]['exact_match']['mean']:+.3f} ± {by_method[m]['exact_match']['std']:.3f}]"
                     for m in ("InfoNCA", "NCA")]
            main = " (main)" if key == rw["main_setting"] else ""
            lines.append(f"| {key}{main} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="results", help="output folder (created)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, few steps, one seed (~1 min)")
    parser.add_argument("--experiments", nargs="+", choices=["identity", "trend", "reward"],
                        default=["identity", "trend", "reward"])
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds (default: 0 1 2; --quick: 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: results do not depend on the core count)")
    parser.add_argument("--set", nargs="+", default=[], metavar="EXP.KEY=VALUE",
                        help="override a setting, e.g. --set trend.beta=0.1 reward.alpha=0 (value parsed as JSON)")
    parser.add_argument("--work-dir", help="where checkpoints go (default: a temporary folder, deleted at the end)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    quiet_libraries()
    settings = json.loads(json.dumps(QUICK if args.quick else FULL))
    for item in args.set:
        key, _, value = item.partition("=")
        exp, _, field = key.partition(".")
        if exp not in settings or field not in settings[exp]:
            parser.error(f"--set {item}: unknown setting {key!r}")
        try:
            settings[exp][field] = json.loads(value)
        except json.JSONDecodeError:
            settings[exp][field] = value
    seeds = args.seeds if args.seeds else settings["seeds"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="nca-reproduce-"))
    work.mkdir(parents=True, exist_ok=True)

    import transformers
    import trl

    results = {
        "command": "python scripts/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "seeds": seeds,
        "settings": {k: v for k, v in settings.items() if k in (*args.experiments, "seeds")},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
                     "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "threads": args.threads,
                    "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "seconds": {},
    }
    start = time.time()
    runners = {"identity": run_identity, "trend": run_trend, "reward": run_reward}
    try:
        for name in ("identity", "trend", "reward"):
            if name not in args.experiments:
                continue
            t0 = time.time()
            results[name] = runners[name](settings[name], seeds, work)
            results["seconds"][name] = time.time() - t0
            print(f"[{name}] done in {results['seconds'][name]:.0f}s", flush=True)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"]["total"] = time.time() - start
    results["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    if "trend" in results:
        for lr in settings["trend"]["grid_lr"]:
            main = lr == settings["trend"]["lr"]
            plot_trend(results["trend"], settings["trend"], lr,
                       out / ("likelihood_trend.png" if main else f"likelihood_trend_lr{lr:g}.png"))
    if "reward" in results:
        plot_reward(results["reward"], settings["reward"], out / "ground_truth_reward.png")
        plot_reward_grid(results["reward"], out / "ground_truth_sensitivity.png")
    (out / "summary.md").write_text(summary_markdown(results))
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    print(summary_markdown(results))
    print(f"wrote {out}/ in {results['seconds']['total']:.0f}s")
    return results


if __name__ == "__main__":
    main()
