"""Experiment 2, `trend`: the likelihood trend (does the likelihood of the preferred completion go up or down?).

A small Mistral-architecture model is first fine-tuned with `trl.SFTTrainer` on the completions of the real rated data
(`data/vicuna_rated.jsonl`); then DPO (best-vs-worst pairs), InfoNCA and NCA (all K=4 completions) are each trained
from that checkpoint with the same steps, learning rate, beta and batch, at every lr of `trend.grid_lr`. Measured
every `trend.eval_every` steps: the mean summed log-likelihood (nats / sequence) of the chosen (best) and rejected
(worst) completions of held-out prompts and of a fixed set of training prompts. The paper's claim: under DPO and
InfoNCA the chosen likelihood falls, under NCA it does not."""

from __future__ import annotations

import random
import time

from .common import (
    METHODS,
    best_worst,
    build_model,
    load_vicuna,
    make_pref_trainer,
    mean_std,
    save_tokenizer,
    sequence_logps,
    sft,
    tokenize_pairs,
    train_metric_history,
    vicuna_completion,
    vicuna_prompt,
)


def lr_key(lr):
    return f"lr={lr:g}"


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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

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
    return save_tokenizer(core, out_dir)


def sft_trend_model(cfg, seed, work, rows, train_all):
    """Random small Mistral-architecture model fine-tuned with trl.SFTTrainer on the completions of the train prompts.

    Tokenizer: `cfg["tokenizer"]` = "bpe" (default: a 2k-token byte-level BPE trained on the training prompts and
    completions, so that the model's compute goes into the transformer rather than a 32k-row LM head) or "mistral"
    (the real Mistral-7B tokenizer via `nca_trl.tiny`, ~10x slower on a CPU)."""
    from transformers import AutoTokenizer

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
    steps = max(1, cfg["sft_epochs"] * len(data) // cfg["sft_batch_size"])
    out = work / f"trend-sft-{seed}"
    trainer = sft(init, tok, data, seed, work / f"trend-sft-{seed}-run", out, steps, cfg["sft_batch_size"],
                  cfg["sft_lr"], cfg["max_length"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return str(out), {"steps": steps, "num_sequences": len(data), "loss_first": losses[0], "loss_last": losses[-1]}


def run_trend(cfg, seeds, work):
    """The `trend` experiment for every seed and every lr of `trend.grid_lr`; returns its part of results.json."""
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
