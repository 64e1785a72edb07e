"""Reproduce the NCA paper's claims at small scale on a CPU, with plots, from one command.

Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards" (NeurIPS 2024). Three experiments,
one module each:

1. `identity` (`identity.py`): InfoNCA with K=2 and one-hot targets (alpha=0) is DPO. Per-example losses and
   gradients of `nca_trl.losses.infonca_loss` vs `-log sigmoid(beta * (l_c - l_r))` on log-ratios of a real model on
   real pairs, and at trainer level `InfoNCATrainer(alpha=0).compute_loss` vs `trl.DPOTrainer(loss_type=["sigmoid"])`
   on the same batch with an explicit reference model of another seed (gradients w.r.t. every parameter compared).
2. `trend` (`trend.py`): the likelihood trend. A small Mistral-architecture model is first fine-tuned with
   `trl.SFTTrainer` on the completions of the real rated data (`data/vicuna_rated.jsonl`), then DPO (best-vs-worst
   pairs), InfoNCA and NCA (all K=4) are trained from that checkpoint with the same steps, learning rate, beta and
   batch, and the mean log-likelihood of the chosen (best) and rejected (worst) completions of held-out prompts and of
   fixed training prompts is measured every few steps. Tokenizer: a 2k-token byte-level BPE trained on the training
   texts (default; with the 32k-token Mistral tokenizer the LM head dominates and a run is ~10x slower:
   `--set trend.tokenizer=mistral`).
3. `reward` (`ground_truth.py`): a ground-truth reward task (sorting digits, partial credit per correct position;
   character-level tokenizer). SFT on a few correct demonstrations, sample K=4 completions per training prompt, score
   them exactly, train DPO on best-vs-worst and InfoNCA / NCA on all four, evaluate greedy outputs on held-out prompts;
   at the main (lr, beta) and over a small (lr, beta) grid.

Everything runs through the real trainers (`trl.SFTTrainer`, `trl.DPOTrainer`, `nca_trl.InfoNCATrainer`,
`nca_trl.NCATrainer`). Outputs in `--out`: `results.json` (every number and setting), `likelihood_trend.png` (main
lr) and `likelihood_trend_lr*.png` (the other lrs), `ground_truth_reward.png`, `ground_truth_sensitivity.png`,
`summary.md` (the tables). Seeded throughout: the same command gives the same numbers.

The rest of the package: `settings.py` (every knob, `--quick`, `--set`), `common.py` (environment, seeding, data,
log-likelihoods, model and trainer builders shared by the experiments), `report.py` (figures and `summary.md`),
`cli.py` (the command line). `nca_trl` is imported as an installed package (`pip install -e .`).

```bash
python scripts/reproduce.py --out results/            # all three experiments, ~11 min on 2 busy CPU cores
python scripts/reproduce.py --out /tmp/r --quick      # smoke run, about a minute
python scripts/reproduce.py --out results/ --experiments trend reward
```
"""
