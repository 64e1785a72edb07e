"""Experiment 3, `reward`: a task with a ground-truth reward (sorting digits), where the true reward is known exactly.

Measures whether using all K rated samples (InfoNCA, NCA) beats binarizing them into best-vs-worst pairs (DPO): a
small model over a character-level tokenizer is fine-tuned (`trl.SFTTrainer`) on a few correct demonstrations, K=4
completions per training prompt are sampled from it and scored exactly (fraction of output positions right), then DPO,
InfoNCA and NCA are trained from the same SFT checkpoint on the same samples, at the main (lr, beta) and at every
(lr, beta) of `reward.grid`. Reported: the mean true reward and exact-match rate of greedy outputs on held-out prompts,
per method and paired by seed against DPO."""

from __future__ import annotations

import random
import time

from .common import (
    METHODS,
    build_model,
    make_pref_trainer,
    mean_std,
    seed_everything,
    sft,
    train_metric_history,
)


def setting_key(lr, beta):
    return f"lr={lr:g},beta={beta:g}"


def build_char_tokenizer(out_dir):
    """The character-level tokenizer (digits, '>', BOS/EOS) of `nca_trl.tiny.save_digits_tokenizer`."""
    from nca_trl.tiny import save_digits_tokenizer

    return save_digits_tokenizer(out_dir)


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
    """The `reward` experiment for every seed and every (lr, beta) of `reward.grid`; its part of results.json."""
    import torch
    from transformers import AutoTokenizer

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
        tok = AutoTokenizer.from_pretrained(init)
        seed_everything(seed)
        sft_path = str(work / f"reward-sft-{seed}")
        trainer = sft(init, tok, [{"prompt": p, "completion": c} for p, c in demos], seed,
                      work / f"reward-sft-{seed}-run", sft_path, cfg["sft_steps"], cfg["sft_batch_size"],
                      cfg["sft_lr"], 32)
        model = trainer.model
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
        del trainer, model

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
