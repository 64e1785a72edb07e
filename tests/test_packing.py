"""The shared-prompt, padding-free layout computes what the plain padded layout computes."""

import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from nca_trl import InfoNCAConfig, InfoNCATrainer, NCAConfig, NCATrainer
from nca_trl.data import DataCollatorForRatedCompletions
from nca_trl.shared_prompt.packing import build_shared_prompt_batch, enable_shared_prompt
from nca_trl.shared_prompt.varlen import KERNEL_ENV

from test_trainer import make_args, record_losses


def ragged(vicuna, n=4):
    """Real rows with K = 2, 3, 4, 2, ... and their real, very different completion lengths."""
    rows = vicuna.select(range(n)).to_list()
    for i, row in enumerate(rows):
        k = 2 + i % 3
        row["completions"], row["rewards"] = row["completions"][:k], row["rewards"][:k]
    return Dataset.from_list(rows)


def both_layouts(trainer, examples):
    collator = trainer.data_collator
    plain = DataCollatorForRatedCompletions(collator.pad_token_id, collator.max_length)(examples)
    packed = DataCollatorForRatedCompletions(collator.pad_token_id, collator.max_length, shared_prompt=True)(examples)
    return plain, packed


def test_layout_structure():
    examples = [
        {"prompt_ids": [1, 2, 3], "completion_ids": [[4, 5], [6]], "rewards": [1.0, 0.0]},
        {"prompt_ids": [7], "completion_ids": [[8], [9, 10], [11]], "rewards": [0.0, 1.0, 2.0]},
    ]
    batch = build_shared_prompt_batch(examples, max_length=None)
    # prefix [1, 2] | 3 4 5 | 3 6 | 7 8 | 7 9 10 | 7 11
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 6, 7, 8, 7, 9, 10, 7, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 0, 1, 2, 0, 1]]
    assert batch["shift_labels"].tolist() == [[-100, -100, 4, 5, -100, 6, -100, 8, -100, 9, 10, -100, 11, -100]]
    # Sequences are numbered slot-major like the plain layout: (b0,c0)=0 (b1,c0)=1 (b0,c1)=2 (b1,c1)=3 (b1,c2)=4
    assert batch["token_sequence"].tolist() == [-1, -1, 0, 0, -1, 2, -1, 1, -1, 3, 3, -1, 4, -1]
    # Attention segments in row order, one varlen call: prompt 0's prefix [1, 2] (keys: itself), its completions
    # (keys: the prefix, then their own tokens), then prompt 1's completions (its prefix is empty: own tokens only)
    assert batch["cu_seqlens_q"].tolist() == [0, 2, 5, 7, 9, 12, 14]
    assert batch["cu_seqlens_k"].tolist() == [0, 2, 7, 11, 13, 16, 18]
    assert batch["kv_index"].tolist() == [0, 1, 0, 1, 2, 3, 4, 0, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert batch["cu_seqlens_q"].dtype == batch["cu_seqlens_k"].dtype == torch.int32
    assert (batch["max_seqlen_q"], batch["max_seqlen_k"]) == (3, 5) and isinstance(batch["max_seqlen_q"], int)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_fixture,attn,kernel",
    [(m, a, None) for m in ("tiny_mistral", "tiny_mixtral") for a in ("sdpa", "eager")]
    + [("tiny_mistral", "sdpa", "padded"), ("tiny_mistral", "sdpa", "reference")],
)
def test_logps_equal_plain_layout_on_real_data(model_fixture, attn, kernel, request, vicuna, hh, tokenizer, monkeypatch):
    """Each CPU varlen path (None: the default) through a real model, on real ragged data."""
    if kernel is not None:
        monkeypatch.setenv(KERNEL_ENV, kernel)
    path = request.getfixturevalue(model_fixture)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    add_fused_lm_head(model)
    rows = ragged(vicuna, 4).to_list() + [
        {"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]], "rewards": [1.0, 0.0]}
        for r in hh.select(range(3))
    ]
    from nca_trl.data.tokenize import tokenize_rated_example

    examples = [tokenize_rated_example(r, tokenizer, tokenizer.eos_token) for r in rows]
    plain = DataCollatorForRatedCompletions(tokenizer.eos_token_id, max_length=192)(examples)
    packed = DataCollatorForRatedCompletions(tokenizer.eos_token_id, max_length=192, shared_prompt=True)(examples)
    assert packed["input_ids"].size(1) < plain["attention_mask"].sum()  # prompts once, no padding

    trainer_like = NCATrainer.__new__(NCATrainer)  # only `_sequence_logps` and the accelerator unwrap are used
    from accelerate import Accelerator

    trainer_like.accelerator = Accelerator(cpu=True)
    with torch.no_grad():
        plain_logps = trainer_like._sequence_logps(model, plain)[-1]
        assert enable_shared_prompt(model).enabled
        packed_logps = trainer_like._sequence_logps(model, packed)[-1]
        again = trainer_like._sequence_logps(model, plain)[-1]  # the plain path is unchanged once enabled
    assert packed_logps.shape == plain_logps.shape == (int(plain["completion_slots"].sum()),)
    assert packed_logps == pytest.approx(plain_logps, abs=2e-4, rel=1e-6)
    assert torch.equal(again, plain_logps)


@pytest.mark.slow
@pytest.mark.parametrize(
    "cls,config_cls,checkpointing",
    [(NCATrainer, NCAConfig, False), (InfoNCATrainer, InfoNCAConfig, False), (NCATrainer, NCAConfig, True)],
)
def test_loss_gradients_and_metrics_equal(
    cls, config_cls, checkpointing, tiny_mistral, tiny_mistral_ref, vicuna, tmp_path
):
    ref = AutoModelForCausalLM.from_pretrained(tiny_mistral_ref)
    args = make_args(config_cls, tmp_path, beta=0.1, max_length=128, activation_checkpointing=checkpointing)
    trainer = cls(model=tiny_mistral, ref_model=ref, args=args, train_dataset=ragged(vicuna, 4))
    assert trainer.data_collator.shared_prompt
    examples = [trainer.train_dataset[i] for i in range(4)]
    plain, packed = both_layouts(trainer, examples)
    trainer.model.train()
    if checkpointing:  # what Trainer.train does with DPOConfig's default activation_checkpointing=True
        trainer.model.activation_checkpointing_enable(trainer.args.activation_checkpointing_kwargs)
        assert trainer.model.is_activation_checkpointing
    results = {}
    for name, batch in (("plain", plain), ("packed", packed)):
        trainer.model.zero_grad()
        trainer._metrics["train"].clear()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k != "num_tokens"}
        results[name] = (loss.item(), grads, metrics)
    (loss_p, grads_p, metrics_p), (loss_s, grads_s, metrics_s) = results["plain"], results["packed"]
    assert loss_s == pytest.approx(loss_p, abs=1e-5)
    assert grads_p.keys() == grads_s.keys()
    for name in grads_p:
        scale = grads_p[name].abs().max().item() + 1e-12
        assert (grads_s[name] - grads_p[name]).abs().max().item() / scale < 1e-3, name
    assert metrics_s.keys() == metrics_p.keys()
    for key in metrics_p:
        assert metrics_s[key] == pytest.approx(metrics_p[key], rel=1e-4, abs=1e-4), key


@pytest.mark.slow
def test_packed_training_with_peft_and_precompute_matches_plain(tiny_mistral, vicuna, tmp_path):
    from peft import LoraConfig

    runs = {}
    for shared in (False, True):
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        args = make_args(
            NCAConfig, tmp_path, max_steps=2, learning_rate=1e-2, max_length=96, beta=0.1,
            shared_prompt=shared, precompute_ref_log_probs=True,
        )  # one pass over 4 ragged rows (K = 2, 3, 4, 2) in batches of 2
        trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=ragged(vicuna, 4), peft_config=peft_config)
        assert trainer.data_collator.shared_prompt == shared
        runs[shared] = (trainer.train_dataset["ref_logps"], record_losses(trainer))
        trainer.train()
    (ref_plain, losses_plain), (ref_packed, losses_packed) = runs[False], runs[True]
    for a, b in zip(ref_plain, ref_packed):
        assert b == pytest.approx(a, rel=2e-6, abs=1e-4)  # float32 resolves -860 to 6e-5
    assert losses_packed == pytest.approx(losses_plain, abs=1e-4)
    assert losses_plain[-1] != losses_plain[0]


def test_fallback_says_why(tiny_mistral, vicuna, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        args = make_args(NCAConfig, tmp_path, truncation_mode="keep_end", max_length=64)
        trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=vicuna.select(range(2)))
    assert not trainer.data_collator.shared_prompt
    assert "Plain padded layout (shared_prompt=None, automatic)" in caplog.text and "truncation_mode" in caplog.text

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    model.config._attn_implementation = "flex_attention"  # an implementation the segment attention cannot replace
    support = enable_shared_prompt(model)
    assert not support.enabled and "flex_attention" in support.reason

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        args = make_args(NCAConfig, tmp_path, max_length=64)
        trainer = NCATrainer(model=model, args=args, train_dataset=vicuna.select(range(2)))
    assert not trainer.data_collator.shared_prompt and "flex_attention" in caplog.text


def test_automatic_layout_on_a_gpu_needs_a_varlen_kernel(tiny_mistral, vicuna, tmp_path, caplog):
    """Found on an H200 (results/gpu_results.json): without a fused varlen kernel the shared-prompt layout is 3.5-5x
    slower than the plain one; with torch's varlen_attn it is 2.7-3.0x faster, short prompts too
    (results/gpu_layouts.json). `shared_prompt=None` (the default) picks it on a CPU, and on a CUDA GPU where a fused
    varlen kernel runs it in bf16/fp16; `True` forces it."""
    from unittest.mock import PropertyMock, patch

    from nca_trl.shared_prompt.varlen import VarlenKernel

    fused = VarlenKernel("a fused varlen kernel", lambda *args: None, cuda=True)
    cases = [  # shared_prompt, bf16, kernel present -> layout on the CPU, on the GPU
        (None, False, False, True, False),
        (None, True, True, True, True),
        (None, True, False, True, False),  # bf16 on the GPU, no fused kernel: plain
        (None, False, True, True, False),  # float32 on the GPU: the fused kernels do not run
        (True, False, False, True, True),
        (False, True, True, False, False),
    ]
    for requested, bf16, present, on_cpu, on_gpu in cases:
        args = make_args(NCAConfig, tmp_path, max_length=64, shared_prompt=requested)
        trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=vicuna.select(range(2)))
        assert trainer.data_collator.shared_prompt is on_cpu, requested
        trainer._layout_checked, trainer.data_collator.shared_prompt = False, False
        trainer.args.bf16 = bf16
        caplog.clear()
        with (
            patch.object(type(trainer.accelerator), "device", new_callable=PropertyMock) as device,
            patch("nca_trl.shared_prompt.packing.cuda_varlen_kernel",
                  return_value=(fused if present else None, "none here")),
            caplog.at_level(logging.INFO, logger="nca_trl"),
        ):
            device.return_value = torch.device("cuda")
            trainer._setup_layout()
        case = (requested, bf16, present)
        assert trainer.data_collator.shared_prompt is on_gpu, case
        if requested is None:
            assert ("Shared-prompt layout (shared_prompt=None, automatic) on cuda with a fused" in caplog.text) is on_gpu, case
            assert ("Plain padded layout (shared_prompt=None, automatic)" in caplog.text) is (not on_gpu), case


def test_flash_attention_2_takes_the_shared_prompt_layout(tiny_mistral, vicuna, tmp_path, monkeypatch):
    """`attn_implementation: flash_attention_2` gets the shared-prompt layout, not a fallback: here, with no CUDA, the
    same varlen path runs on the CPU stand-in, and gives the plain layout's log-probs. No T x T mask is built."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model, ref = (AutoModelForCausalLM.from_pretrained(tiny_mistral) for _ in range(2))
    for m in (model, ref):
        m.config._attn_implementation = "flash_attention_2"  # what loading with flash-attn installed sets
    args = make_args(NCAConfig, tmp_path, max_length=48, shared_prompt=True)
    trainer = NCATrainer(model=model, ref_model=ref, args=args, train_dataset=ragged(vicuna, 3))
    assert trainer.data_collator.shared_prompt
    for m in (trainer.model, trainer.ref_model):
        assert m.config._attn_implementation == "nca_shared_prompt|flash_attention_2"
    examples = [trainer.train_dataset[i] for i in range(3)]
    plain, packed = both_layouts(trainer, examples)

    def no_mask(*args, **kwargs):
        raise AssertionError("a mask was built for a shared-prompt batch")

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "nca_shared_prompt|flash_attention_2", no_mask)
    with torch.no_grad():
        packed_logps = trainer._sequence_logps(trainer.model, packed)[-1]
        reference = AutoModelForCausalLM.from_pretrained(tiny_mistral, attn_implementation="sdpa")
        add_fused_lm_head(reference)
        plain_logps = trainer._sequence_logps(reference, plain)[-1]
    assert packed_logps == pytest.approx(plain_logps, abs=2e-4, rel=1e-6)


@pytest.mark.parametrize("loaded", ["flash_attention_2", "kernels-community/flash-attn2"])
def test_plain_batches_of_a_flash_model_load_its_kernel_by_its_own_name(tiny_mistral, loaded, monkeypatch):
    """A plain batch (`predict()`, an evaluation with `compute_metrics`, `generate()`) through a model routed to the
    shared-prompt layout runs the attention it was loaded with. transformers' flash wrapper loads its kernel by the
    config's name, which was the routed one: `flash_attention_2` raised ("Could not find the currently requested flash
    attention implementation at `nca_shared_prompt|flash_attention_2`"), a hub kernel re-registered transformers'
    wrapper over the layout's attention. Stopped at the kernel's import: no flash-attn here."""
    import transformers.modeling_flash_attention_utils as flash_utils
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from nca_trl.shared_prompt.packing import shared_prompt_attention

    routed = f"nca_shared_prompt|{loaded}"
    for registry, function in ((ALL_ATTENTION_FUNCTIONS, flash_attention_forward),
                               (ALL_MASK_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])):
        monkeypatch.setitem(registry._global_mapping, loaded, registry._global_mapping.get(loaded, function))
        monkeypatch.setitem(registry._global_mapping, routed, registry._global_mapping.get(routed))  # removed after
    imported = []

    class KernelImport(Exception):
        pass

    def lazy_import(implementation, *args, **kwargs):
        imported.append(implementation)
        raise KernelImport

    monkeypatch.setattr(flash_utils, "lazy_import_flash_attention", lazy_import)
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    model.config._attn_implementation = loaded  # what loading with the kernel available sets
    assert enable_shared_prompt(model, 48).enabled and model.config._attn_implementation == routed
    with pytest.raises(KernelImport), torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 2]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
    assert imported == [loaded]
    assert model.config._attn_implementation == routed and ALL_ATTENTION_FUNCTIONS[routed] is shared_prompt_attention
