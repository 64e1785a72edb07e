"""Trainer-level tests on tiny random Mistral / Mixtral models with the real Mistral tokenizer and real data."""

import inspect
import logging
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import DPOConfig, DPOTrainer

from nca_trl import InfoNCAConfig, InfoNCATrainer, NCAConfig, NCATrainer
from nca_trl.data import DataValidationError
from nca_trl.shared_prompt.packing import enable_shared_prompt
from nca_trl.metrics import from_slots

METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/ranking_accuracy",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
]


def make_args(cls, tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_length=128,
        learning_rate=1e-3,
        logging_steps=1,
        max_steps=3,
        report_to="none",
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        activation_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )
    defaults.update(kwargs)
    return cls(**defaults)


def short_prompts(hh, n):
    """The first n HH-RLHF pairs whose dialogue fits in 160 characters (most of HH is long multi-turn context)."""
    return hh.filter(lambda row: len(row["prompt"]) < 160).select(range(n))


def record_losses(trainer):
    """Record the exact (unrounded) loss of every `compute_loss` call."""
    losses = []
    original = trainer.compute_loss

    def compute_loss(*args, **kwargs):
        out = original(*args, **kwargs)
        losses.append((out[0] if isinstance(out, tuple) else out).detach().item())
        return out

    trainer.compute_loss = compute_loss
    return losses


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class GradientRecorder(TrainerCallback):
    """Every optimizer step's full gradient (all parameters, flattened, before clipping)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(torch.cat([p.grad.detach().reshape(-1).clone() for p in model.parameters()
                                     if p.grad is not None]))


# --------------------------------------------------------------------------------------------------- API


def test_public_api_and_signature():
    assert issubclass(NCATrainer, DPOTrainer) and issubclass(InfoNCATrainer, DPOTrainer)
    parent = inspect.signature(DPOTrainer.__init__)
    for cls in (NCATrainer, InfoNCATrainer):
        sig = inspect.signature(cls.__init__)
        assert list(sig.parameters) == list(parent.parameters)
        assert [p.default for p in sig.parameters.values()] == [p.default for p in parent.parameters.values()]


def test_config_defaults_and_rejected_dpo_fields(tmp_path):
    args = NCAConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False)
    assert args.beta == 0.01 and args.alpha is None and args.max_completions is None and args.loss_type == ["nca"]
    # An accepted alias is stored as the loss trained
    assert NCAConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, loss_type="nca_pair").loss_type == ["nca"]
    assert InfoNCAConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, loss_type="sigmoid").loss_type == ["infonca"]
    assert InfoNCAConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).loss_type == ["infonca"]
    for field, value in [
        ("label_smoothing", 0.1),
        ("label_smoothing_factor", 0.1),  # transformers' token-level smoothing: accepted and ignored before
        ("ld_alpha", 0.5),
        ("f_divergence_type", "js_divergence"),
        ("use_weighting", True),
        ("loss_weights", [1.0]),
        ("loss_type", "ipo"),
        ("alpha", -1.0),
        ("max_completions", 1),
        ("truncation_mode", "keep_middle"),  # accepted, then "Unsupported truncation mode" at the first batch
    ]:
        with pytest.raises(ValueError, match=field):
            NCAConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **{field: value})


def test_plain_dpo_config_accepted_and_dpo_fields_rejected(tiny_mistral, vicuna, tmp_path, caplog):
    args = make_args(DPOConfig, tmp_path, beta=0.05)
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=vicuna.select(range(4)))
    assert trainer.alpha == 1.0 and trainer.beta == 0.05
    # What is trained is said once, and the trainer's arguments (saved as training_args.bin) name it; the caller's
    # config object is left as it was
    said = [r.getMessage() for r in caplog.records if "trains the NCA loss" in r.getMessage()]
    assert len(said) == 1 and "loss_type=['sigmoid']" in said[0] and "DPOConfig" in said[0], caplog.text
    assert trainer.args.loss_type == ["nca"] and args.loss_type == ["sigmoid"] and trainer.args.beta == 0.05
    with pytest.raises(ValueError, match="label_smoothing"):
        NCATrainer(model=tiny_mistral, args=make_args(DPOConfig, tmp_path, label_smoothing=0.1), train_dataset=vicuna)
    with pytest.raises(ValueError, match="loss_type"):
        InfoNCATrainer(model=tiny_mistral, args=make_args(DPOConfig, tmp_path, loss_type="nca_pair"), train_dataset=vicuna)


# --------------------------------------------------------------------------------------------------- DPO identities


def best_worst_pairs(rated):
    def pair(row):
        order = sorted(range(len(row["rewards"])), key=lambda i: row["rewards"][i])
        return {"chosen": row["completions"][order[-1]], "rejected": row["completions"][order[0]]}

    return rated.map(pair, remove_columns=["completions", "rewards"])


@pytest.fixture(scope="module")
def dpo_runs():
    """DPOTrainer's step losses and logged metrics, per (DPO loss, data, max_length): the same DPO run is the reference
    of both layouts (it has no layout setting), so the plain and shared-prompt tests train it once between them."""
    return {}


def pair_config(config, config_cls, dpo_loss, tmp_path, shared_prompt, **common):
    """The config a user of each kind passes on pairs: `NCAConfig()` / `InfoNCAConfig()` with `alpha` left unset, or a
    plain `trl.DPOConfig` with the matching TRL `loss_type` (DPOConfig's default for InfoNCA). A plain DPOConfig has no
    `shared_prompt`: its layout is the automatic one (shared-prompt on a CPU), or the plain one with padded shapes."""
    if config == "default":
        return make_args(config_cls, tmp_path, shared_prompt=shared_prompt, **common)
    loss_type = {"loss_type": [dpo_loss]} if dpo_loss != "sigmoid" else {}
    padded = {} if shared_prompt else {"pad_to_multiple_of": 8}
    return make_args(DPOConfig, tmp_path, **loss_type, **padded, **common)


@pytest.mark.slow
@pytest.mark.parametrize(
    "config,shared_prompt,data_name,max_length",
    [
        ("default", False, "hh", 80),
        ("default", True, "hh", 80),
        ("default", True, "vicuna", 256),
        ("DPOConfig", False, "hh", 80),
        ("DPOConfig", True, "hh", 80),
    ],
    ids=["plain-hh", "shared_prompt-hh", "shared_prompt-vicuna-long", "DPOConfig-plain-hh", "DPOConfig-shared-hh"],
)
@pytest.mark.parametrize(
    "cls,config_cls,dpo_loss", [(InfoNCATrainer, InfoNCAConfig, "sigmoid"), (NCATrainer, NCAConfig, "nca_pair")]
)
def test_pairs_train_the_dpo_trainer_loss_by_default(
    cls, config_cls, dpo_loss, config, shared_prompt, data_name, max_length, tiny_mistral, tiny_mistral_ref, hh,
    vicuna, dpo_runs, tmp_path,
):
    """The drop-in on preference pairs, with the configs users start from (alpha unset, or a plain DPOConfig) and an
    explicit reference model that differs from the policy: three steps with the same losses, gradient norms, metrics
    and final weights as trl.DPOTrainer with the matching loss (NCA: `nca_pair`, InfoNCA: `sigmoid`), in both layouts,
    also on long (256-token) sequences whose log-prob sums float32 resolves to ~1e-4 only."""
    data = short_prompts(hh, 4) if data_name == "hh" else best_worst_pairs(vicuna.select(range(4)))
    common = dict(beta=0.1, max_steps=3, per_device_train_batch_size=2, max_length=max_length, learning_rate=2e-4)

    run = (dpo_loss, data_name, max_length)
    if run not in dpo_runs:
        ref = AutoModelForCausalLM.from_pretrained(tiny_mistral_ref)
        dpo_grads = GradientRecorder()
        dpo = DPOTrainer(
            model=tiny_mistral,
            ref_model=ref,
            args=make_args(DPOConfig, tmp_path / "dpo", loss_type=[dpo_loss], **common),
            train_dataset=data,
            callbacks=[dpo_grads],
        )
        dpo_losses = record_losses(dpo)
        dpo.train()
        dpo_runs[run] = dpo_losses, [h for h in dpo.state.log_history if "rewards/chosen" in h], dpo_grads.grads
    dpo_losses, dpo_logs, dpo_grads = dpo_runs[run]

    ref = AutoModelForCausalLM.from_pretrained(tiny_mistral_ref)
    args = pair_config(config, config_cls, dpo_loss, tmp_path, shared_prompt, **common)
    our_grads = GradientRecorder()
    ours = cls(model=tiny_mistral, ref_model=ref, args=args, train_dataset=data, callbacks=[our_grads])
    assert ours.data_collator.shared_prompt == shared_prompt
    assert ours.args.loss_type == [config_cls.loss]  # the saved arguments say what is trained
    our_losses = record_losses(ours)
    ours.train()

    assert len(dpo_losses) == len(our_losses) == 3
    # Not the trivial constant of an implicit reference at step 0
    assert abs(dpo_losses[0] - (math.log(2) if dpo_loss == "sigmoid" else 2 * math.log(2))) > 1e-3
    # float32 resolves a 256-token log-prob sum to ~1e-4, i.e. ~1e-5 in a loss with beta 0.1: after one update in
    # another summation order, the long case differs by up to about that (1.2e-5 with transformers 5.25, also before
    # nca-trl's issue 26 changes); the short cases agree to 1e-6
    assert our_losses == pytest.approx(dpo_losses, abs=3e-5 if max_length > 128 else 1e-5)
    # The updates changed the model: step 3 starts the second pass over the 4 rows (batch 2), with another loss
    assert abs(dpo_losses[2] - dpo_losses[0]) > 1e-3
    # The same gradients, step by step (every parameter's), and the same metrics
    assert len(our_grads.grads) == len(dpo_grads) == 3
    for step, (g, expected) in enumerate(zip(our_grads.grads, dpo_grads)):
        relative_error = ((g - expected).norm() / expected.norm()).item()  # soft targets on pairs: ~0.5
        assert relative_error < 1e-3, f"step {step + 1}: relative gradient error {relative_error:.2e}"
    our_logs = [h for h in ours.state.log_history if "rewards/chosen" in h]
    for key in ("grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert [h[key] for h in our_logs] == pytest.approx(
            [h[key] for h in dpo_logs], rel=3e-5 if max_length > 128 else 1e-5, abs=1e-4), key


@pytest.mark.slow
def test_mixed_dataset_one_hot_for_pairs_only(tiny_mistral, tiny_mistral_ref, vicuna, hh, tmp_path, caplog):
    """A dataset mixing rated rows and chosen/rejected pairs: each pair's loss is NCA with one-hot targets, each rated
    row's NCA with softmax(rewards / alpha), in one batch; alpha changes the rated rows' losses, never the pairs'."""
    from nca_trl.losses import nca_loss
    from nca_trl.metrics import to_slots

    pairs = short_prompts(hh, 2)
    rows = [{"prompt": r["prompt"], "completions": r["completions"], "rewards": r["rewards"], "chosen": None,
             "rejected": None} for r in vicuna.filter(lambda r: len(set(r["rewards"])) == 4).select(range(2))]
    rows += [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "completions": None,
              "rewards": None} for r in pairs]
    data = Dataset.from_list([rows[0], rows[2], rows[1], rows[3]])  # rated, pair, rated, pair
    losses = {}
    for alpha in (0.5, 3.0):
        ref = AutoModelForCausalLM.from_pretrained(tiny_mistral_ref)
        args = make_args(NCAConfig, tmp_path, alpha=alpha, beta=0.5, max_length=64, per_device_eval_batch_size=4)
        with caplog.at_level(logging.INFO, logger="nca_trl"):
            trainer = NCATrainer(model=tiny_mistral, ref_model=ref, args=args, train_dataset=data)
        assert "rows, rated+preference" in caplog.text and "2 preference pairs" in caplog.text
        assert trainer.train_dataset["preference_pair"] == [False, True, False, True]
        batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader(trainer.train_dataset))))  # in order
        assert batch["preference_pair"].tolist() == [False, True, False, True]
        with torch.no_grad():
            trainer.compute_loss(trainer.model, batch)
            logps = to_slots(trainer._sequence_logps(trainer.model, batch)[-1], batch["completion_slots"])
            ref_logps = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        logratios, slots, rewards = logps - ref_logps, batch["completion_slots"], batch["rewards"]
        assert not torch.allclose(logratios[slots], torch.zeros(()))
        for b, expected_alpha in enumerate([alpha, 0.0, alpha, 0.0]):
            one = slice(b, b + 1)
            expected = nca_loss(logratios[one], rewards[one], beta=0.5, alpha=expected_alpha, mask=slots[one])
            torch.testing.assert_close(trainer._row_losses[one], expected, rtol=1e-6, atol=1e-6)
        losses[alpha] = trainer._row_losses
    assert torch.equal(losses[0.5][[1, 3]], losses[3.0][[1, 3]])
    assert (losses[0.5][[0, 2]] - losses[3.0][[0, 2]]).abs().min() > 1e-4


def test_alpha_on_pairs_only_is_said_once(tiny_mistral, hh, tmp_path, caplog):
    data = short_prompts(hh, 2)
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path, alpha=0.5), train_dataset=data)
    said = [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()]
    assert len(said) == 1 and "alpha=0.5" in said[0] and "'nca_pair'" in said[0], caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nca_trl"):  # unset: nothing to say
        NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path), train_dataset=data)
    assert not [r for r in caplog.records if "does not apply" in r.getMessage()]


# --------------------------------------------------------------------------------------------------- training on real data


@pytest.mark.slow
@pytest.mark.parametrize("cls,config_cls", [(NCATrainer, NCAConfig), (InfoNCATrainer, InfoNCAConfig)])
def test_training_on_vicuna_rated(cls, config_cls, tiny_mistral, vicuna, tmp_path):
    # Prompts whose four rewards all differ, and sharp targets: the loss can fall well below its start
    data = vicuna.filter(lambda row: len(set(row["rewards"])) == 4).select(range(4))
    args = make_args(
        config_cls, tmp_path, alpha=0.1, beta=0.1, learning_rate=3e-3, max_steps=6, num_train_epochs=3, max_length=64
    )
    trainer = cls(model=tiny_mistral, args=args, train_dataset=data)
    losses = record_losses(trainer)
    before = params(trainer.model)
    trainer.train()
    first = 2 * math.log(2) if cls is NCATrainer else math.log(4)
    assert losses[0] == pytest.approx(first, abs=1e-5)  # implicit reference: every log-ratio is 0 at step 0
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses
    after = params(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logged = [h for h in trainer.state.log_history if "loss" in h][-1]
    for key in METRICS:
        assert key in logged, key


@pytest.mark.slow
def test_training_on_hh_preference(tiny_mistral, hh, tmp_path):
    # The whole (small) dataset in every step, so that successive losses are comparable
    args = make_args(
        NCAConfig, tmp_path, beta=0.1, learning_rate=1e-3, max_steps=5, num_train_epochs=5, max_length=96,
        per_device_train_batch_size=4,
    )
    trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=short_prompts(hh, 4))
    losses = record_losses(trainer)
    before = params(trainer.model)
    trainer.train()
    assert losses[0] == pytest.approx(2 * math.log(2), abs=1e-5)
    assert losses[-1] < losses[0] - 0.03, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    after = params(trainer.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    logged = [h for h in trainer.state.log_history if "loss" in h][-1]
    for key in METRICS:
        assert key in logged, key


# --------------------------------------------------------------------------------------------------- ragged K, precompute


@pytest.mark.slow
def test_ragged_batch_equals_each_prompt_alone(tiny_mistral, tiny_mistral_ref, vicuna, tmp_path):
    rows = vicuna.select(range(3)).to_list()
    for row, k in zip(rows, (2, 3, 4)):
        row["completions"], row["rewards"] = row["completions"][:k], row["rewards"][:k]
    data = Dataset.from_list(rows)
    ref = AutoModelForCausalLM.from_pretrained(tiny_mistral_ref)
    trainer = NCATrainer(
        model=tiny_mistral, ref_model=ref, args=make_args(NCAConfig, tmp_path, max_length=64), train_dataset=data
    )
    trainer.model.eval()
    examples = [trainer.train_dataset[i] for i in range(3)]
    with torch.no_grad():
        together = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()
        alone = [trainer.compute_loss(trainer.model, trainer.data_collator([e])).item() for e in examples]
    assert [len(e["completion_ids"]) for e in examples] == [2, 3, 4]
    assert together == pytest.approx(sum(alone) / 3, abs=1e-5)
    assert len(set(round(a, 4) for a in alone)) == 3


@pytest.mark.slow
@pytest.mark.parametrize("cls,config_cls", [(NCATrainer, NCAConfig), (InfoNCATrainer, InfoNCAConfig)])
def test_precomputed_reference_equals_live(cls, config_cls, tiny_mistral, tiny_mistral_ref, vicuna, tmp_path):
    data = vicuna.select(range(4))  # one pass over the rows in batches of 2
    runs = []
    for precompute in (False, True):
        ref = AutoModelForCausalLM.from_pretrained(tiny_mistral_ref)
        args = make_args(config_cls, tmp_path, max_steps=2, precompute_ref_log_probs=precompute, max_length=64)
        trainer = cls(model=tiny_mistral, ref_model=ref, args=args, train_dataset=data)
        if precompute:
            assert "ref_logps" in trainer.train_dataset.column_names
            assert [len(r) for r in trainer.train_dataset["ref_logps"]] == [4] * 4
        losses = record_losses(trainer)
        trainer.train()
        runs.append(losses)
    assert runs[1] == pytest.approx(runs[0], abs=1e-5)


@pytest.mark.slow
def test_a_dataset_with_reference_log_probs_gets_this_trainer_s(tiny_mistral, tiny_mistral_ref, vicuna, tmp_path):
    """A dataset prepared with precomputed reference log-probs (another trainer's `train_dataset`, or `evaluate()`
    given the trainer's own `eval_dataset`): its `ref_logps` column was concatenated to the new one, and `datasets`
    raised "The table can't have duplicated columns"."""
    data = vicuna.select(range(4))
    first = NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path / "a", max_length=64,
                                                          precompute_ref_log_probs=True),
                       train_dataset=data, eval_dataset=data)
    metrics = first.evaluate()
    again = first.evaluate(first.eval_dataset)
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-6)
    second = NCATrainer(model=tiny_mistral, ref_model=AutoModelForCausalLM.from_pretrained(tiny_mistral_ref),
                        args=make_args(NCAConfig, tmp_path / "b", max_length=64, precompute_ref_log_probs=True),
                        train_dataset=first.train_dataset)
    batch = second.data_collator([second.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        live = second.compute_ref_log_probs(second.ref_model, batch)
    expected = [row[slots].tolist() for row, slots in zip(live, batch["completion_slots"].bool())]
    got = second.train_dataset["ref_logps"]
    assert all(g == pytest.approx(e, abs=1e-4) for g, e in zip(got, expected))  # the new reference's, not the old
    assert not all(g == pytest.approx(o, abs=1e-4) for g, o in zip(got, first.train_dataset["ref_logps"]))


# --------------------------------------------------------------------------------------------------- PEFT, eval, save


@pytest.mark.slow
def test_peft_lora_reference_is_adapter_disabled(tiny_mistral, vicuna, tmp_path):
    from peft import LoraConfig

    data = vicuna.select(range(4))
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = make_args(NCAConfig, tmp_path, max_steps=3, learning_rate=1e-2, max_length=64)
    trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=data, peft_config=peft_config)
    assert trainer.ref_model is None
    before = params(trainer.model)
    trainer.train()
    after = params(trainer.model)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all("lora_" in n for n in changed)

    # The reference log-probs are those of the base model (adapters disabled), not of the trained policy
    base = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(base)
    enable_shared_prompt(base)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    ref = trainer.compute_ref_log_probs(trainer.model, batch)
    base_logps = trainer._sequence_logps(base, batch)[-1]
    slots = batch["completion_slots"]
    assert from_slots(ref, slots) == pytest.approx(base_logps.detach(), abs=1e-4)
    trainer.model.eval()
    with torch.no_grad():
        policy_logps = trainer._sequence_logps(trainer.model, batch)[-1]
    assert not torch.allclose(policy_logps, base_logps, atol=1e-3)


@pytest.mark.slow
def test_evaluate_save_reload_and_model_card(tiny_mistral, vicuna, tmp_path):
    args = make_args(InfoNCAConfig, tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, max_length=64)
    trainer = InfoNCATrainer(
        model=tiny_mistral, args=args, train_dataset=vicuna.select(range(4)), eval_dataset=vicuna.select(range(4, 8))
    )
    trainer.train()
    metrics = trainer.evaluate()
    for key in ("eval_loss", "eval_rewards/chosen", "eval_rewards/accuracies", "eval_rewards/ranking_accuracy"):
        assert key in metrics, key
    assert any("eval_loss" in h for h in trainer.state.log_history)

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    trainer.create_model_card(model_name="tiny-infonca")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    trained = trainer.model.state_dict()
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[name]), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2402.05369" in card and "Noise Contrastive Alignment" in card and "nca-trl" in card


# --------------------------------------------------------------------------------------------------- formats, MoE


def test_conversational_rated_with_chat_template(tiny_mistral, tokenizer, vicuna, tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "completions": [[{"role": "assistant", "content": c}] for c in r["completions"]],
            "rewards": r["rewards"],
        }
        for r in vicuna.select(range(4))
    ]
    args = make_args(NCAConfig, tmp_path, max_steps=2, max_length=96)
    trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=Dataset.from_list(rows))
    example = trainer.train_dataset[0]
    assert tokenizer.decode(example["prompt_ids"]).endswith("[/INST]")
    assert example["prompt_ids"][0] == tokenizer.bos_token_id
    assert all(ids[-1] == tokenizer.eos_token_id for ids in example["completion_ids"])
    losses = record_losses(trainer)
    trainer.train()
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


@pytest.mark.slow
def test_tiny_mixtral_router_aux_loss(tiny_mixtral, vicuna, tmp_path):
    args = make_args(NCAConfig, tmp_path, max_steps=2, max_length=64)
    trainer = NCATrainer(model=tiny_mixtral, args=args, train_dataset=vicuna.select(range(4)))
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == pytest.approx(0.02)
    losses = record_losses(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert logged["aux_loss"] > 0
    # The loss includes the aux term: it is above the pure NCA constant at step 0
    assert losses[0] > 2 * math.log(2)


# --------------------------------------------------------------------------------------------------- data handling


def test_bad_rows_fail_before_training(tiny_mistral, vicuna, tmp_path):
    rows = vicuna.select(range(4)).to_list()
    rows[2]["rewards"][1] = float("nan")
    with pytest.raises(DataValidationError, match=r"row 2.*rewards"):
        NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path), train_dataset=Dataset.from_list(rows))


def test_rows_without_room_are_dropped_with_a_count(tiny_mistral, vicuna, tmp_path, caplog):
    rows = vicuna.select(range(4)).to_list()
    rows[1]["prompt"] = "word " * 200  # fills max_length=64 on its own
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        trainer = NCATrainer(
            model=tiny_mistral, args=make_args(NCAConfig, tmp_path, max_length=64), train_dataset=Dataset.from_list(rows)
        )
    assert len(trainer.train_dataset) == 3
    assert "dropped 1 of 4 rows" in caplog.text and "rows 1" in caplog.text


def test_max_completions_keeps_best_and_worst(tiny_mistral, vicuna, tmp_path):
    rows = vicuna.select(range(2)).to_list()
    rows[0]["rewards"] = [2.0, 5.0, 1.0, 3.0]
    args = make_args(NCAConfig, tmp_path, max_completions=2, max_length=64)
    trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=Dataset.from_list(rows))
    assert trainer.train_dataset[0]["rewards"] == [5.0, 1.0]
    assert all(len(r) == 2 for r in trainer.train_dataset["rewards"])


def test_streaming_dataset_and_implicit_prompt_pairs(tiny_mistral, hh, tmp_path):
    # Implicit-prompt preference pairs, as HH-RLHF ships them (the prompt inside chosen and rejected), streamed
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in hh.select(range(8))]
    stream = Dataset.from_list(rows).to_iterable_dataset()
    args = make_args(NCAConfig, tmp_path, max_steps=2, max_length=256)
    trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=stream)
    losses = record_losses(trainer)
    trainer.train()
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)

    bad = Dataset.from_list([{"prompt": "Hi", "completions": ["a", "b"], "rewards": [1.0, float("inf")]}] * 3)
    with pytest.raises(DataValidationError, match="row 0.*rewards"):
        # a stream is validated row by row as it is read: with max_length set, at preparation, which reads it up to
        # its first kept row (a stream that keeps none is refused, not trained for 0 steps)
        NCATrainer(model=tiny_mistral, args=args, train_dataset=bad.to_iterable_dataset()).train()


@pytest.mark.slow
def test_accuracy_ignores_completions_tied_with_the_best(tiny_mistral, tiny_mistral_ref, vicuna, tmp_path):
    """With rewards (5, 5, 1, 1) the best completion (first of the tie) must beat the two worse ones, not its tie."""
    from nca_trl.trainer import to_slots

    ref = AutoModelForCausalLM.from_pretrained(tiny_mistral_ref)
    trainer = NCATrainer(
        model=tiny_mistral, ref_model=ref, args=make_args(NCAConfig, tmp_path, max_length=64),
        train_dataset=vicuna.select(range(1)),
    )
    trainer.model.eval()
    example = trainer.train_dataset[0]
    with torch.no_grad():
        batch = trainer.data_collator([example])
        g = (to_slots(trainer._sequence_logps(trainer.model, batch)[-1], batch["completion_slots"])
             - trainer.compute_ref_log_probs(trainer.ref_model, batch))[0]
    first, second, *rest = torch.argsort(g, descending=True).tolist()
    # The tied-best pair is put with its lower implicit reward first: it is "the best" and beats only the worse two
    order = [second, first, *rest]
    reordered = {
        "prompt_ids": example["prompt_ids"],
        "completion_ids": [example["completion_ids"][i] for i in order],
        "rewards": [5.0, 5.0, 1.0, 1.0],
    }
    trainer._pooled["eval"].clear()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, trainer.data_collator([reordered]))
    metrics = trainer._pooled["eval"].sums  # [numerator, denominator]
    assert metrics["rewards/accuracies"] == [1.0, 1.0]
    # The ranking accuracy counts the 4 pairs with different rewards: all ranked right
    assert metrics["rewards/ranking_accuracy"] == [4.0, 4.0]


@pytest.mark.slow  # over a few seconds on 2 cores
def test_logged_metrics_are_pooled_over_prompts_however_the_batches_split(tiny_mistral, tiny_mistral_ref, vicuna,
                                                                         tmp_path):
    """A logged metric was the mean of its micro-batches' values: the ranking accuracy of 1 of 4 pairs (batch 2)
    logged 0.1667 as two micro-batches, and an evaluation of 3 prompts in batches of 2 gave `rewards/chosen` the mean
    of two batch means. Now every metric is a sum over the prompts of the step (or evaluation) divided by a count: the
    same for eval batches of 1, 2 and 4, and for a batch of 2 against 2 accumulated micro-batches of 1. `evaluate` of
    a dict names each set's metrics by it (they all went under `eval_`, the last set's), and `metric_key_prefix`
    prefixes them (they stayed `eval_`)."""
    rows = vicuna.select(range(3)).to_list()
    rows[1]["completions"], rows[1]["rewards"] = rows[1]["completions"][:2], rows[1]["rewards"][:2]
    rows.append({**rows[2], "rewards": [1.0] * len(rows[2]["rewards"])})  # all tied: no accuracy, no pair
    data = Dataset.from_list(rows)
    ref = AutoModelForCausalLM.from_pretrained(tiny_mistral_ref)

    def trainer(**kwargs):
        args = make_args(NCAConfig, tmp_path, max_length=64, learning_rate=0.0, max_steps=1, **kwargs)
        return NCATrainer(model=tiny_mistral, ref_model=ref, args=args, train_dataset=data.select([0, 2]),
                          eval_dataset=data)

    def metrics(logged: dict) -> dict:
        return {k: v for k, v in logged.items() if k.removeprefix("eval_").startswith(
            ("rewards/", "logps/", "logits/", "entropy", "mean_token", "loss"))}

    evaluations = [metrics(trainer(per_device_eval_batch_size=b).evaluate()) for b in (1, 2, 4)]
    assert {"eval_rewards/ranking_accuracy", "eval_rewards/accuracies", "eval_logits/chosen"} <= set(evaluations[0])
    for other in evaluations[1:]:
        assert other.keys() == evaluations[0].keys()
        assert all(other[k] == pytest.approx(evaluations[0][k], rel=1e-5, abs=1e-6) for k in other), other

    steps = []
    for batch, accumulation in ((2, 1), (1, 2)):
        run = trainer(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        run.train()
        steps.append(metrics(run.state.log_history[0]))
    assert steps[0].keys() == steps[1].keys() and "rewards/ranking_accuracy" in steps[0]
    assert all(steps[1][k] == pytest.approx(steps[0][k], rel=1e-5, abs=1e-6) for k in steps[0] if k != "loss"), steps

    one = trainer()
    named = one.evaluate({"a": data.select([2]), "b": data.select([1])})  # (row 0's rewards all tie: no chosen)
    assert named["eval_a_rewards/chosen"] != named["eval_b_rewards/chosen"] and "eval_rewards/chosen" not in named
    assert named["eval_a_rewards/chosen"] == pytest.approx(one.evaluate(data.select([2]))["eval_rewards/chosen"])
    assert "test_rewards/chosen" in one.evaluate(data, metric_key_prefix="test")


@pytest.mark.slow  # over a few seconds on 2 cores
def test_an_uneven_last_accumulation_window_weighs_prompts_as_one_batch(tiny_mistral, tiny_mistral_ref, vicuna,
                                                                          tmp_path):
    """3 prompts in accumulated micro-batches of 2 and 1 (an epoch's last window): the lone prompt weighed as two in
    the loss and the gradient (transformers divides each micro-batch's mean by the window's 2 micro-batches; loss
    1.3325 where one batch of 3 gives 1.3601 in one case), and the logged metrics left a prompt out (accelerate cut
    every micro-batch of the window to the last batch's 1 row). Now the step is the one batch of 3's."""
    rows = vicuna.select(range(3)).to_list()
    for row, k in zip(rows, (4, 2, 3)):
        row["completions"], row["rewards"] = row["completions"][:k], row["rewards"][:k]
    data, ref = Dataset.from_list(rows), AutoModelForCausalLM.from_pretrained(tiny_mistral_ref)
    logged = []
    for batch, accumulation in ((3, 1), (2, 2), (1, 3)):
        args = make_args(NCAConfig, tmp_path, max_length=64, learning_rate=0.0, max_steps=1,
                         per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        trainer = NCATrainer(model=tiny_mistral, ref_model=ref, args=args, train_dataset=data)
        trainer.train()
        logged.append({k: v for k, v in trainer.state.log_history[0].items() if k != "learning_rate"})
    assert {"loss", "grad_norm", "rewards/chosen", "logps/chosen", "num_tokens"} <= logged[0].keys()
    for other in logged[1:]:
        assert other.keys() == logged[0].keys()
        assert all(other[k] == pytest.approx(logged[0][k], rel=1e-5, abs=1e-6) for k in other), (other, logged[0])


def test_an_evaluation_pools_each_row_once():
    """A stream's last batch on several processes is padded with its first rows, which `gather_for_metrics` cannot
    drop: an evaluation's pooled metrics (and its loss) count a row seen again once. Training's count every row."""
    from nca_trl.metrics import PooledMetrics

    numerators, denominators = torch.tensor([[2.0, 1.0], [4.0, 0.0], [2.0, 1.0]]), torch.ones(3, 2)
    rows = torch.tensor([0, 1, 0])  # row 0 again: the padding
    evaluation, training = PooledMetrics(once_per_row=True), PooledMetrics()
    for pooled in (evaluation, training):
        pooled.add(["loss", "rewards/accuracies"], numerators, denominators, rows)
    assert evaluation.values() == {"loss": 3.0, "rewards/accuracies": 0.5}
    assert training.values() == pytest.approx({"loss": 8 / 3, "rewards/accuracies": 2 / 3})
    evaluation.add(["loss"], torch.tensor([[6.0]]), torch.ones(1, 1), torch.tensor([1]))  # seen: left out
    assert evaluation.values()["loss"] == 3.0
    evaluation.clear()
    assert evaluation.values() == {} and not evaluation.seen

@pytest.mark.slow  # over a few seconds on 2 cores
def test_compute_metrics_gets_every_completion(tiny_mistral, vicuna, tmp_path):
    """3 prompts with K = 3, 2, 4 in eval batches of 2: accelerate cut the last batch's 4 completion rows to 1 (its
    count of prompts), so `compute_metrics` got 6 rows of 9. One process now gathers them whole (several processes:
    tests/test_distributed.py)."""
    rows = vicuna.select(range(3)).to_list()
    for row, k in zip(rows, (3, 2, 4)):
        row["completions"], row["rewards"] = row["completions"][:k], row["rewards"][:k]
    seen = []

    def compute_metrics(prediction):
        seen.append((prediction.predictions.shape[0], prediction.label_ids.shape[0]))
        return {"rows": float(prediction.predictions.shape[0])}

    data = Dataset.from_list(rows)
    trainer = NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path, max_length=48), train_dataset=data,
                         eval_dataset=data, compute_metrics=compute_metrics)
    assert trainer.evaluate()["eval_rows"] == 9.0 and seen == [(9, 9)]


@pytest.mark.slow
def test_reference_forwards_leave_the_checkpointing_settings_as_they_were(tiny_mistral, vicuna, tmp_path):
    """Each step's reference forward turns activation checkpointing off and back on. Back on, it was re-enabled with
    the raw `activation_checkpointing_kwargs`: from step 1 on every layer was checkpointed (`every_n_layers` lost),
    `offload` dropped, and both keys went on to torch's checkpoint (with `use_reentrant: true`: "Unexpected keyword
    arguments: every_n_layers,offload"). The layers' flags and checkpoint functions are the same after training."""
    args = make_args(NCAConfig, tmp_path, max_steps=2, activation_checkpointing=True,
                     activation_checkpointing_kwargs={"use_reentrant": False, "every_n_layers": 2})
    states = []

    class Layers(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):  # checkpointing set up, no step yet
            states.append(self.state(model))

        def on_train_end(self, args, state, control, model=None, **kwargs):
            states.append(self.state(model))

        @staticmethod
        def state(model):
            return [(m.gradient_checkpointing, m._gradient_checkpointing_func) for m in model.modules()
                    if type(m).__name__.endswith("DecoderLayer")]

    trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=vicuna.select(range(4)), callbacks=[Layers()])
    trainer.train()
    assert [on for on, _ in states[0]] == [True, False]  # every second layer, as asked
    assert states[1] == states[0]
