"""Switches the configs inherit from `trl.DPOConfig` / `TrainingArguments`: each works (shown here) or is refused with
its reason. `padding_free`, `sync_ref_model`, `use_liger_kernel` / `use_liger_loss`, `use_kernels`,
`activation_offloading`, `LogCompletionsCallback`, and image columns in any dataset."""

import contextlib
import importlib.util
import logging
import math
import warnings
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, TrainerCallback
from transformers.utils import is_liger_kernel_available
from trl import DPOConfig, DPOTrainer
from trl.models import activation_offloading
from trl.trainer.callbacks import LogCompletionsCallback

from nca_trl import NCAConfig, NCATrainer
from nca_trl.data import DataCollatorForRatedCompletions
from nca_trl.config import check_rated_config
from nca_trl.shared_prompt.packing import is_shared_prompt_batch

from test_trainer import make_args, record_losses, short_prompts

NCA_AT_ZERO = 2 * math.log(2)  # the NCA loss of any prompt when every log-ratio is 0 (policy == reference)


@contextlib.contextmanager
def all_messages(caplog):
    """Every log record (WARNING and up) and every warning raised in the block, as strings."""
    messages = []
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    messages += [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]


def distinct_rewards(vicuna, n):
    """n real rows whose four rewards all differ (the loss moves away from its value at log-ratio 0)."""
    return vicuna.filter(lambda row: len(set(row["rewards"])) == 4).select(range(n))


# --------------------------------------------------------------------------------------------------- padding_free


def test_padding_free_is_the_shared_prompt_layout(tiny_mistral, vicuna, hh, tmp_path, caplog):
    # Control: TRL's own trainer warns that padding_free falls back to standard padding, and the capture sees it
    with all_messages(caplog) as messages:
        args = make_args(DPOConfig, tmp_path, padding_free=True)
        DPOTrainer(model=tiny_mistral, args=args, train_dataset=short_prompts(hh, 2))
    assert any("Falling back to standard padding" in m for m in messages)
    caplog.clear()

    # A plain DPOConfig too: padding_free=True is our padding-free layout, with no warning about padding
    rows = vicuna.select(range(2))
    with all_messages(caplog) as messages:
        args = make_args(DPOConfig, tmp_path, padding_free=True)
        trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=rows)
    assert not [m for m in messages if "padding" in m.lower() or "Plain padded layout" in m], messages
    assert trainer.args.padding_free is True  # the user's value, hidden from DPOTrainer only during its __init__
    assert trainer.data_collator.shared_prompt and trainer.padding_free

    # The collator lays the batch out as one row of real tokens: each prompt once, then its completions, no padding
    examples = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(examples)
    assert is_shared_prompt_batch(batch) and batch["input_ids"].shape[0] == 1
    max_length = trainer.args.max_length
    expected = 0
    for e in examples:
        p = len(e["prompt_ids"])
        expected += p - 1 + sum(1 + min(len(c), max(max_length - p, 0)) for c in e["completion_ids"])
    assert batch["input_ids"].shape[1] == expected


def test_padding_free_errors(tiny_mistral, vicuna, tmp_path):
    with pytest.raises(ValueError, match=r"`padding_free=True`.*`shared_prompt=False`"):
        NCAConfig(output_dir=str(tmp_path), use_cpu=True, padding_free=True, shared_prompt=False)
    # Where the layout cannot run, padding_free=True is an error with the reason, never a silent fallback; where the
    # settings alone say so, the config refuses them (the trainer did, once the model had loaded)
    with pytest.raises(ValueError, match=r"`padding_free=True` requires the shared-prompt layout.*pad_to_multiple_of"):
        make_args(NCAConfig, tmp_path, padding_free=True, pad_to_multiple_of=8)
    for blocker in (dict(truncation_mode="keep_end"), dict(neftune_noise_alpha=5.0), dict(pad_to_multiple_of=8)):
        with pytest.raises(ValueError, match=r"`shared_prompt=True` requires the shared-prompt layout, which cannot "
                                             r"run exactly here: `(truncation_mode|neftune_noise_alpha|pad_to_multi)"):
            NCAConfig(output_dir=str(tmp_path), use_cpu=True, shared_prompt=True, **blocker)
        NCAConfig(output_dir=str(tmp_path), use_cpu=True, **blocker)  # automatic: plain, said at construction
    with pytest.raises(ValueError, match=r"`sync_ref_model=True` with `precompute_ref_log_probs=True`"):
        NCAConfig(output_dir=str(tmp_path), use_cpu=True, sync_ref_model=True, precompute_ref_log_probs=True)
    collator = DataCollatorForRatedCompletions(pad_token_id=2, pad_to_multiple_of=8)  # a collator's own padding
    with pytest.raises(ValueError, match=r"`padding_free=True` requires the shared-prompt layout.*pad_to_multiple_of"):
        NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path, padding_free=True), data_collator=collator,
                   train_dataset=vicuna.select(range(2)))


# --------------------------------------------------------------------------------------------------- sync_ref_model


class SnapshotAfterStep(TrainerCallback):
    """Added after the trainer's SyncRefModelCallback, so it sees the models right after each step's sync."""

    def __init__(self, trainer):
        self.trainer, self.equal, self.ref = trainer, {}, {}

    def on_step_end(self, args, state, control, **kwargs):
        policy = dict(self.trainer.model.named_parameters())
        ref = {n: p.detach().clone() for n, p in self.trainer.ref_model.named_parameters()}
        self.equal[state.global_step] = all(torch.equal(policy[n], ref[n]) for n in policy)
        self.ref[state.global_step] = ref


def test_sync_ref_model_copies_the_policy_every_n_steps(tiny_mistral, vicuna, tmp_path):
    """TR-DPO's hard update (alpha=1) every 2 steps, implicit reference: the reference equals the policy right after
    steps 2 (and only then), and the loss of step 3 is that of log-ratios all 0."""
    args = make_args(
        NCAConfig, tmp_path, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=1.0, max_steps=3,
        per_device_train_batch_size=1, max_length=48, learning_rate=1e-2,
    )
    trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=distinct_rewards(vicuna, 3))
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    snapshots = SnapshotAfterStep(trainer)
    trainer.add_callback(snapshots)
    losses = record_losses(trainer)
    trainer.train()

    assert snapshots.equal == {1: False, 2: True, 3: False}
    # The loss really uses the synced reference: 2 log 2 exactly where policy == reference (steps 1 and 3)
    assert losses[0] == pytest.approx(NCA_AT_ZERO, abs=1e-6)
    assert abs(losses[1] - NCA_AT_ZERO) > 1e-4
    assert losses[2] == pytest.approx(NCA_AT_ZERO, abs=1e-6)


def test_sync_ref_model_mixup(tiny_mistral, tiny_mistral_ref, vicuna, tmp_path):
    """Soft update with an explicit reference: ref <- 0.5 * policy + 0.5 * ref, after step 2 only."""
    args = make_args(
        NCAConfig, tmp_path, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5, max_steps=2,
        per_device_train_batch_size=1, max_length=48,
    )
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_mistral_ref)
    ref_before = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    trainer = NCATrainer(model=tiny_mistral, ref_model=ref_model, args=args, train_dataset=distinct_rewards(vicuna, 2))
    snapshots = SnapshotAfterStep(trainer)
    trainer.add_callback(snapshots)
    trainer.train()

    name = "model.layers.0.self_attn.q_proj.weight"
    policy = dict(trainer.model.named_parameters())[name].detach()
    assert all(torch.equal(snapshots.ref[1][n], ref_before[n]) for n in ref_before)  # no sync after step 1
    mixed = snapshots.ref[2][name]
    torch.testing.assert_close(mixed, 0.5 * policy + 0.5 * ref_before[name], rtol=1e-6, atol=0)
    assert not torch.equal(mixed, policy) and not torch.equal(mixed, ref_before[name])


# --------------------------------------------------------------------------------------------------- Liger, kernels


def test_liger_switches_refused_where_they_cannot_work(tiny_mistral, vicuna, tmp_path, monkeypatch):
    common = dict(output_dir=str(tmp_path), use_cpu=True)
    if not is_liger_kernel_available():
        with pytest.raises(ValueError, match=r"`use_liger_kernel=True` needs the `liger-kernel` package"):
            NCAConfig(use_liger_kernel=True, **common)
    # Installed, but the kernels are Triton GPU kernels: refused on CPU, with a plain DPOConfig at the trainer too
    monkeypatch.setattr("transformers.utils.is_liger_kernel_available", lambda *a, **k: True)
    with pytest.raises(ValueError, match=r"`use_liger_kernel=True` cannot run on 'cpu'"):
        NCAConfig(use_liger_kernel=True, **common)
    dpo_args = DPOConfig(use_liger_kernel=True, **common)
    with pytest.raises(ValueError, match=r"`use_liger_kernel=True` cannot run on 'cpu'"):
        NCATrainer(model=tiny_mistral, args=dpo_args, train_dataset=vicuna.select(range(2)))
    # Liger's fused DPO loss is pairwise: not a field of this TRL's DPOConfig, and refused should it come back
    with pytest.raises((TypeError, ValueError), match="use_liger_loss"):
        NCAConfig(use_liger_loss=True, **common)
    dpo_args = DPOConfig(**common)
    dpo_args.use_liger_loss = True
    with pytest.raises(ValueError, match=r"`use_liger_loss=True` has no meaning for NCA \(loss .nca.\): .*pairwise"):
        check_rated_config(dpo_args, NCAConfig)


@pytest.mark.slow  # over a few seconds on 2 cores
def test_use_kernels_with_and_without_the_kernels_package(tiny_mistral, vicuna, tmp_path, monkeypatch):
    """`use_kernels` is a `from_pretrained` option (in `model_init_kwargs`), not a DPOConfig field. With the `kernels`
    package (transformers installs it, so the README's install has it) the trainer loads the model with it and trains
    the same loss and gradients on a CPU (no hub kernel applies here, nothing downloads); without the package
    transformers refuses it when the trainer loads the model (simulated: before, this test was skipped wherever the
    package was installed, i.e. always)."""
    import transformers.modeling_utils as modeling_utils

    data = vicuna.select(range(2))
    plain = NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path / "plain"), train_dataset=data)
    kernels = NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path / "kernels", model_init_kwargs={
        "use_kernels": True}), train_dataset=data)
    batch = plain.data_collator([plain.train_dataset[i] for i in range(2)])
    for trainer in (plain, kernels):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
    (loss_a, grads_a), (loss_b, grads_b) = (training_step_and_grads(t, batch) for t in (plain, kernels))
    assert torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)

    monkeypatch.setattr(modeling_utils, "is_kernels_available", lambda: False)
    args = make_args(NCAConfig, tmp_path / "missing", model_init_kwargs={"use_kernels": True})
    with pytest.raises(ValueError, match="Kernels are not available"):
        NCATrainer(model=tiny_mistral, args=args, train_dataset=data)


# ------------------------------------------------------------------------------ activation_offloading


def training_step_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.training_step(trainer.model, dict(batch))
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_neftune_trains_in_the_plain_layout(tiny_mistral, vicuna, tmp_path, caplog):
    """transformers scales NEFTune's noise by alpha / sqrt(length x hidden): in the shared-prompt row the length is
    the whole batch's, so the noise was silently weaker (2.4x at 6 prompts) and each prompt's shared by its K
    completions. With `neftune_noise_alpha` the automatic layout is plain (logged), `shared_prompt=True` refused, and
    the noise is the plain layout's: alpha / sqrt(L x hidden) for the batch's padded length L."""
    data = vicuna.select(range(4))
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        trainer = NCATrainer(model=tiny_mistral, train_dataset=data, args=make_args(
            NCAConfig, tmp_path, max_steps=1, max_length=64, neftune_noise_alpha=5.0))
    assert not trainer.data_collator.shared_prompt and "neftune_noise_alpha scales its embedding noise" in caplog.text
    noise = []

    def record(module, args, out):  # after NEFTune's hook, which train() adds: the noise it added
        noise.append((out.shape[1], (out - torch.nn.functional.embedding(args[0], module.weight)).abs().max().item()))

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.get_input_embeddings().register_forward_hook(record)

    trainer.add_callback(Record())
    trainer.train()
    length, largest = noise[0]
    bound = 5.0 / math.sqrt(length * trainer.model.config.hidden_size)
    assert length == trainer.args.max_length and 0.9 * bound < largest <= bound
    with pytest.raises(ValueError, match="`shared_prompt=True` .* `neftune_noise_alpha=5.0` scales"):  # by the config
        NCATrainer(model=tiny_mistral, train_dataset=data, args=make_args(
            NCAConfig, tmp_path, shared_prompt=True, neftune_noise_alpha=5.0))


def test_activation_offloading(tiny_mistral, vicuna, tmp_path):
    # Refused on CPU: nothing to offload to, and TRL's offloader needs an accelerator
    with pytest.raises(ValueError, match=r"`activation_offloading=True`.*training runs on the CPU"):
        NCAConfig(output_dir=str(tmp_path), use_cpu=True, activation_offloading=True)
    if torch.accelerator.current_accelerator() is None:  # what TRL's trainer would hit at __init__
        with pytest.raises(AttributeError):
            activation_offloading.get_act_offloading_ctx_manager(torch.nn.Linear(2, 2))

    # TRL's offloader on the trainer's own training step (shared-prompt layout), made to treat the CPU as the
    # accelerator (no streams, no pinned memory): every saved activation goes through its pack/unpack hooks, and the
    # loss and gradients are exactly those of the step without it
    args = make_args(NCAConfig, tmp_path, max_length=48)
    trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=distinct_rewards(vicuna, 2))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert is_shared_prompt_batch(batch)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss, grads = training_step_and_grads(trainer, batch)
    with mock.patch.object(torch.accelerator, "current_accelerator", return_value=torch.device("cpu")):
        offload = activation_offloading.get_act_offloading_ctx_manager(
            trainer.model, use_pin_memory=False, use_streams=False, min_offload_size=0
        )
    trainer.maybe_activation_offload_context = offload
    offloaded_loss, offloaded_grads = training_step_and_grads(trainer, batch)
    assert offload.tensor_id > 50  # the hooks saw the forward's activations
    assert offloaded_loss.item() == loss.item()
    assert grads.keys() == offloaded_grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name in grads:
        assert torch.equal(offloaded_grads[name], grads[name]), name


# ------------------------------------------------------------------------------ LogCompletionsCallback


@pytest.mark.slow
def test_log_completions_callback_generates_for_rated_eval_prompts(tiny_mistral, vicuna, tmp_path):
    """TRL's callback reads the eval set's `prompt` column, which rated data keeps: it generates with the trained
    policy (through the shared-prompt attention wrapper, which hands generation to sdpa) what a plain sdpa copy of
    the same weights generates."""
    eval_rows = vicuna.select(range(4, 6))
    args = make_args(NCAConfig, tmp_path, max_steps=1, max_length=48, per_device_train_batch_size=1)
    trainer = NCATrainer(
        model=tiny_mistral, args=args, train_dataset=distinct_rewards(vicuna, 1), eval_dataset=eval_rows
    )
    assert trainer.data_collator.shared_prompt
    generation_config = GenerationConfig(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    callback = LogCompletionsCallback(trainer, generation_config=generation_config, freq=1)
    trainer.add_callback(callback)
    trainer.train()

    assert [(step, prompt) for step, prompt, _ in callback.table] == [("1", p) for p in eval_rows["prompt"]]
    plain = AutoModelForCausalLM.from_pretrained(tiny_mistral, attn_implementation="sdpa")
    plain.load_state_dict(trainer.model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral, padding_side="left")
    tokenizer.pad_token = trainer.processing_class.pad_token
    inputs = tokenizer(list(eval_rows["prompt"]), return_tensors="pt", padding=True)
    generated = plain.generate(**inputs, generation_config=generation_config)[:, inputs["input_ids"].shape[1] :]
    expected = tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert [completion for _, _, completion in callback.table] == expected
    assert all(completion.strip() for completion in expected)


# --------------------------------------------------------------------------------------------------- images


def test_images_refused_in_any_dataset(tiny_mistral, vicuna, tmp_path):
    rows = vicuna.select(range(2))
    with_images = rows.add_column("images", [[], []])
    with_image = rows.add_column("image", [None, None])
    args = make_args(NCAConfig, tmp_path)
    cases = [
        (dict(train_dataset=with_images), r"the train dataset has the column 'images'"),
        (dict(train_dataset=rows, eval_dataset=with_image), r"the eval dataset has the column 'image'"),
        (dict(train_dataset=rows, eval_dataset={"clean": rows, "vision": with_images}), r"the eval \('vision'\) dataset"),
        (dict(train_dataset=rows, eval_dataset=with_image.to_iterable_dataset()), r"the eval dataset has the column"),
    ]
    for datasets, message in cases:
        # DPOTrainer's words first (its own refusal of images for a text-only model), then which dataset and why
        with pytest.raises(ValueError, match=r"^The dataset appears to be vision-related \(contains 'image' or "
                           r"'images' keys\): " + message + r".*does not support vision datasets"):
            NCATrainer(model=tiny_mistral, args=args, **datasets)
