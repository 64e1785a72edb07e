"""Experiment 1, `identity`: InfoNCA with K=2 and one-hot targets (alpha=0) is DPO.

Measures, on real preference pairs (the repo's vicuna best-vs-worst pairs, and Anthropic HH: tests/data's rows, or
`../shared/data/hh_helpful_test.jsonl` where it exists), how far apart the two objectives are:

- loss level: per-example losses and gradients of `nca_trl.losses.infonca_loss` vs `-log sigmoid(beta * (l_c - l_r))`
  on the log-ratios of a small random model against a reference of another seed, at each beta of `identity.betas`;
- trainer level: `InfoNCATrainer(alpha=0).compute_loss` vs `trl.DPOTrainer(loss_type=["sigmoid"])` one example at a
  time with an explicit reference model, the loss and the gradient w.r.t. every parameter, for both nca_trl batch
  layouts (plain padded, and the default shared-prompt packing).

Expected: differences at float32 rounding level."""

from __future__ import annotations

import json

from .common import (
    HH,
    best_worst,
    load_vicuna,
    sequence_logps,
    tokenize_pairs,
    trainer_args,
    vicuna_completion,
    vicuna_prompt,
)


def real_pairs(source, n):
    """n real (prompt, chosen, rejected) pairs: vicuna best-vs-worst (repo data) or Anthropic HH (`common.HH`)."""
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
    """The `identity` experiment at the first seed; returns its part of results.json."""
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
