"""The default layout is exact on every decoder family a TRL user trains (DESIGN §7): each family either takes the
shared-prompt layout with the plain layout's per-completion log-probs, or stays plain and says why.

Tiny random models of each family (`tests/model_families.py`, from transformers' configs, no download) go through the
trainers' own log-prob path (`_sequence_logps`) on real rows, float32, with segments longer than their sliding
windows: forward passes only, no training runs.
"""

import copy
import json
import logging
import math
import re

from types import SimpleNamespace
from unittest.mock import PropertyMock, patch

import pytest
import torch
import torch.nn.attention.varlen as torch_varlen
from datasets import Dataset
from model_families import FAMILIES, WINDOW, build_family
from transformers import AutoModelForCausalLM
from trl import DPOConfig

from nca_trl import NCAConfig, NCATrainer
from nca_trl.data import DataCollatorForRatedCompletions
from nca_trl.runtime.router_aux import expert_count
from nca_trl.shared_prompt.families import (
    EXACT_FAMILIES, EXACT_MULTIMODAL, WINDOW_FAMILIES, attention_modules, attention_variants, shared_prompt_support,
)
from nca_trl.shared_prompt import varlen
from nca_trl.shared_prompt.packing import _register, shared_prompt_forward

from test_trainer import make_args

# Families with position-mixing layers other than attention: SSM / Mamba state, short convolutions, linear attention
HYBRID = {"lfm2", "nemotron_h", "jamba", "falcon_h1", "granitemoehybrid", "bamba", "qwen3_next"}
MAX_LENGTH = 48


def rows(vicuna) -> Dataset:
    """Three real prompts with K = 4, 3, 2 rated completions: prompts and completions longer than `WINDOW` tokens."""
    out = vicuna.select(range(3)).to_list()
    for i, row in enumerate(out):
        row["completions"], row["rewards"] = row["completions"][: 4 - i], row["rewards"][: 4 - i]
    return Dataset.from_list(out)


def build(family: str, seed: int = 0):
    try:
        return build_family(family, seed)
    except (ValueError, ImportError, KeyError, TypeError) as e:  # a family this transformers does not ship
        pytest.skip(f"this transformers cannot build {family}: {e}")


def trainer_for(family, tokenizer, vicuna, tmp_path, config_cls=NCAConfig, **kwargs):
    """An `NCATrainer` on `family` with a user's default settings (the layout left to `shared_prompt=None`)."""
    args = config_cls(output_dir=str(tmp_path / "out"), report_to="none", max_length=MAX_LENGTH, use_cpu=True,
                      per_device_train_batch_size=3, **kwargs)
    return NCATrainer(model=build(family), ref_model=build(family), args=args, train_dataset=rows(vicuna),
                      processing_class=tokenizer)


def logps_both_layouts(trainer):
    """(plain layout's, trainer's own layout's) per-completion log-probs `[N]` of the policy on the train rows."""
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    collator = trainer.data_collator
    plain = DataCollatorForRatedCompletions(collator.pad_token_id, collator.max_length)(examples)
    own = collator(examples)
    with torch.no_grad():
        return trainer._sequence_logps(trainer.model, plain)[-1], trainer._sequence_logps(trainer.model, own)[-1], own


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_layout_is_exact(family, tokenizer, vicuna, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        trainer = trainer_for(family, tokenizer, vicuna, tmp_path)
    shared = trainer.data_collator.shared_prompt
    plain, own, batch = logps_both_layouts(trainer)
    torch.testing.assert_close(own, plain, rtol=1e-5, atol=0)
    if family in HYBRID:
        assert not shared, family
        assert "Plain padded layout (shared_prompt=None, automatic): policy model:" in caplog.text
    else:
        assert shared, f"{family}: {caplog.text}"  # every attention-only family takes the layout on a CPU
        assert EXACT_FAMILIES[trainer.model.config.get_text_config().model_type]
        assert int(batch["max_seqlen_k"]) > 2 * WINDOW  # segments reach past a sliding window


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lfm2", "qwen3_next", "nemotron_h", "jamba"])
def test_bypassing_the_allow_list_shows_the_leak(family, tokenizer, vicuna, tmp_path):
    """The comparison above can fail: forced into the shared-prompt layout, a hybrid's convolution / SSM / linear
    attention state carries one completion into the next."""
    trainer = trainer_for(family, tokenizer, vicuna, tmp_path)
    examples = [trainer.train_dataset[i] for i in range(3)]
    plain = DataCollatorForRatedCompletions(trainer.data_collator.pad_token_id, MAX_LENGTH)(examples)
    packed = DataCollatorForRatedCompletions(trainer.data_collator.pad_token_id, MAX_LENGTH, shared_prompt=True)(
        examples
    )
    config = trainer.model.config
    config._attn_implementation = _register(config._attn_implementation)  # what the allow-list refuses to do
    with torch.no_grad():
        a = trainer._sequence_logps(trainer.model, plain)[-1]
        b = trainer._sequence_logps(trainer.model, packed)[-1]
    assert ((a - b).abs() / a.abs()).max() > 1e-4, family


@pytest.mark.slow
@pytest.mark.parametrize("family, overrides, error", [
    ("stablelm", dict(num_hidden_layers=2), "StableLmAttention got no shared-prompt layout .* shared_prompt=False"),
    ("phimoe", dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
     "PhimoeForCausalLM's attention uses sliding_window .* but none of its attention calls was given it"),
])
def test_attention_that_misses_the_layout_raises_instead_of_leaking(family, overrides, error, tokenizer, vicuna,
                                                                     tmp_path, monkeypatch):
    """Two ways a model that the allow-list does not admit would give wrong log-probs in the shared-prompt layout
    (3e-2 relative off, each completion seeing the others), caught at the forward pass: StableLM's decoder layer does
    not pass keyword arguments on to its attention, so the layout never reaches it; PhiMoE applies its sliding window
    only through the mask, which the layout does not build."""
    monkeypatch.setitem(FAMILIES, family, (family, overrides))
    monkeypatch.setitem(EXACT_FAMILIES, family, family)  # what the allow-lists refuse to do
    monkeypatch.setitem(WINDOW_FAMILIES, family, None)
    trainer = trainer_for(family, tokenizer, vicuna, tmp_path)
    assert trainer.data_collator.shared_prompt
    with pytest.raises(RuntimeError, match=error):
        logps_both_layouts(trainer)


@pytest.mark.slow
@pytest.mark.parametrize("window", [131072, WINDOW])
def test_a_window_the_family_does_not_declare_is_not_applied_nor_required(window, tokenizer, vicuna, tmp_path,
                                                                         monkeypatch):
    """A Llama checkpoint converted from another family keeps that family's `sliding_window` in its config.json
    (131072 in a converted Qwen 2.5's); Llama's code never reads it. Both layouts attend without a window, and the
    shared-prompt forward does not ask for one (it raised "uses sliding_window ... none of its attention calls was
    given it" at the first forward before)."""
    monkeypatch.setitem(FAMILIES, "llama", ("llama", dict(num_hidden_layers=2, sliding_window=window)))
    trainer = trainer_for("llama", tokenizer, vicuna, tmp_path)
    assert trainer.model.config.sliding_window == window and trainer.data_collator.shared_prompt
    assert attention_variants(trainer.model) == set()
    plain, own, _ = logps_both_layouts(trainer)
    torch.testing.assert_close(own, plain, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family, overrides, reason", [
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
     "Qwen2MoeForCausalLM has a sliding window (config.sliding_window=8) that qwen2_moe's attention does not give its "
     "kernel: its mask alone applies it"),
    ("smollm3", dict(use_sliding_window=False, layer_types=["full_attention", "sliding_attention"] * 2),
     "SmolLM3ForCausalLM has a sliding window (config.sliding_window=8) that smollm3's attention does not give its "
     "kernel unless config.use_sliding_window is true"),
])
def test_a_window_only_the_mask_applies_is_plain_at_construction(family, overrides, reason, tokenizer, vicuna,
                                                                  tmp_path, monkeypatch, caplog):
    """Qwen2-MoE's attention never passes its window to the kernel, SmolLM3's only with `use_sliding_window` (its mask
    follows `layer_types`): their masks alone apply it, and the shared-prompt layout builds no mask. Plain at
    construction, the reason logged; an explicit `shared_prompt=True` is refused there. (Before, they took the layout
    and the forward check stopped the run at its first step.)"""
    model_type, base = FAMILIES[family]
    monkeypatch.setitem(FAMILIES, family, (model_type, {**base, **overrides}))
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        trainer = trainer_for(family, tokenizer, vicuna, tmp_path)
    assert not trainer.data_collator.shared_prompt and reason in caplog.text
    plain, own, _ = logps_both_layouts(trainer)
    torch.testing.assert_close(own, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot run here, or not exactly: policy model: " + re.escape(reason)):
        trainer_for(family, tokenizer, vicuna, tmp_path / "explicit", shared_prompt=True)
    # No segment longer than the window: the layout is taken, and its forward passes with the plain log-probs (the
    # forward check asked for the window all the same, and the first step raised)
    monkeypatch.setitem(FAMILIES, family, (model_type, {**base, **overrides, "sliding_window": MAX_LENGTH}))
    long_window = trainer_for(family, tokenizer, vicuna, tmp_path / "long_window")
    plain, own, batch = logps_both_layouts(long_window)
    assert long_window.data_collator.shared_prompt and WINDOW < int(batch["max_seqlen_k"]) <= MAX_LENGTH
    torch.testing.assert_close(own, plain, rtol=1e-5, atol=0)
    with pytest.raises(RuntimeError, match="attention uses sliding_window"):  # a longer row would need it
        with shared_prompt_forward(long_window.model, MAX_LENGTH + 1):
            pass


@pytest.mark.parametrize("family", ["lfm2", "qwen3_next"])
def test_explicit_shared_prompt_on_a_hybrid_is_refused_naming_the_layer(family, tokenizer, vicuna, tmp_path):
    for setting in ({"shared_prompt": True}, {"padding_free": True}):
        with pytest.raises(ValueError, match=r"cannot run here, or not exactly: policy model: layer 0 of \w+ is '"):
            trainer_for(family, tokenizer, vicuna, tmp_path, **setting)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("family, router_logits", [("granitemoe", False), ("granitemoehybrid", True)])
def test_moe_families_that_name_their_experts_otherwise_train_with_the_load_balancing_loss(family, router_logits,
                                                                                          tokenizer, vicuna, tmp_path,
                                                                                          monkeypatch):
    """TRL's fused LM head computes the MoE load-balancing loss with `config.num_experts`; Granite-MoE and the Granite 4
    hybrids name it `num_local_experts`, so their first training step raised AttributeError with the default settings
    (in `trl.DPOTrainer` too). The number is lent to the config for each forward only: the loss gains the weighted aux
    term, and neither the config nor the saved config.json keeps `num_experts`. With `output_router_logits` in the
    config, the fused head computes the loss in the reference model's forwards too (it raised there)."""
    model_type, overrides = FAMILIES[family]
    monkeypatch.setitem(FAMILIES, family, (model_type, {**overrides, "output_router_logits": router_logits}))
    losses = {}
    for coef in (None, 0.0):  # the config's own coefficient, then the loss turned off
        trainer = trainer_for(family, tokenizer, vicuna, tmp_path / str(coef), max_steps=1, learning_rate=0.0,
                              router_aux_loss_coef=coef)
        assert trainer.aux_loss_enabled is (coef is None)
        trainer.train()
        losses[coef] = trainer.state.log_history[0]
    aux, weight = losses[None]["aux_loss"], trainer.model.config.router_aux_loss_coef
    assert aux > 0 and "aux_loss" not in losses[0.0]
    assert losses[None]["train_loss"] - losses[0.0]["train_loss"] == pytest.approx(weight * aux, rel=1e-3)
    assert not hasattr(trainer.model.config, "num_experts")
    trainer.save_model(str(tmp_path / "saved"))
    assert "num_experts" not in json.loads((tmp_path / "saved" / "config.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family, dense", [("granitemoehybrid", dict(num_local_experts=0, num_experts_per_tok=0)),
                                           ("jamba", dict(num_experts=1, num_experts_per_tok=1)),
                                           ("qwen2_moe", dict(mlp_only_layers=[0, 1]))])
@pytest.mark.parametrize("router_logits", [False, True])
def test_a_dense_model_of_a_moe_family_trains_without_the_load_balancing_loss(family, dense, router_logits, tokenizer,
                                                                              vicuna, tmp_path, monkeypatch, caplog):
    """Granite 4's dense checkpoints are `granitemoehybrid` with `num_local_experts` 0, a Jamba downcycled to dense has
    one expert and no router, a Qwen2-MoE whose `mlp_only_layers` cover every layer has no MoE layer: no router logits
    to balance, so TRL's fused head raised IndexError at the first step (with `output_router_logits` in the config, in
    the reference forward and in `compute_metrics`' forward too). The loss is off for them, said once; the config
    keeps its `output_router_logits`."""
    model_type, overrides = FAMILIES[family]
    monkeypatch.setitem(FAMILIES, family, (model_type, {**overrides, **dense, "output_router_logits": router_logits}))
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        trainer = trainer_for(family, tokenizer, vicuna, tmp_path, max_steps=1)
    assert not trainer.aux_loss_enabled and "has no router to balance (no MoE layer, or at most" in caplog.text
    trainer.train()
    assert "aux_loss" not in trainer.state.log_history[0] and math.isfinite(trainer.state.log_history[0]["train_loss"])
    assert trainer.model.config.output_router_logits is router_logits is trainer.ref_model.config.output_router_logits
    if not trainer.data_collator.shared_prompt:  # the hybrids: compute_metrics' padded-logits forward
        trainer.compute_metrics = lambda prediction: {"rows": float(len(prediction.label_ids))}
        completions = sum(len(ids) for ids in trainer.train_dataset["completion_ids"])  # every one, not 3 (prompts)
        assert trainer.evaluate(trainer.train_dataset)["eval_rows"] == completions


def test_a_model_config_that_asks_for_router_logits_trains_with_the_loss_off(tokenizer, vicuna, tmp_path, monkeypatch):
    """`output_router_logits` in the config made TRL's fused head compute the loss in every forward, so a model whose
    number of experts cannot be found was refused even with `router_aux_loss_coef=0.0`; with the loss off, no forward
    computes it."""
    model_type, overrides = FAMILIES["granitemoe"]
    monkeypatch.setitem(FAMILIES, "granitemoe", (model_type, {**overrides, "output_router_logits": True}))
    trainer = trainer_for("granitemoe", tokenizer, vicuna, tmp_path, router_aux_loss_coef=0.0)
    for model in (trainer.model, trainer.ref_model):
        model.num_experts = model.config.num_local_experts = None  # what the fused head could not find
    loss = trainer.compute_loss(trainer.model, trainer.data_collator([trainer.train_dataset[i] for i in range(3)]))
    assert not trainer.aux_loss_enabled and torch.isfinite(loss) and trainer.model.config.output_router_logits is True


def test_a_policy_without_a_number_of_experts_is_refused_before_the_reference_precompute(tokenizer, vicuna, tmp_path,
                                                                                        monkeypatch):
    calls = []
    monkeypatch.setattr(NCATrainer, "compute_ref_log_probs", lambda self, *a: calls.append(1))
    model = build("granitemoe")
    model.num_experts = model.config.num_local_experts = None
    args = NCAConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=MAX_LENGTH, use_cpu=True,
                     precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="neither GraniteMoeForCausalLM nor its config gives the number of experts"):
        NCATrainer(model=model, ref_model=build("granitemoe"), args=args, train_dataset=rows(vicuna),
                   processing_class=tokenizer)
    assert calls == []


def test_a_moe_model_without_a_number_of_experts_is_refused_naming_the_fix():
    model = build("granitemoe")
    assert expert_count(model) == 4 == expert_count(build("mixtral"))  # from num_local_experts, num_experts
    model.num_experts = model.config.num_local_experts = None
    with pytest.raises(ValueError, match="neither GraniteMoeForCausalLM nor its config gives the number of experts .* "
                                         "Set router_aux_loss_coef=0.0"):
        expert_count(model)


def test_unknown_family_is_plain_and_says_why(tiny_mistral):
    """The allow-list: a model type nobody tested is plain, whatever its layers look like."""
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    assert shared_prompt_support(model).enabled
    model.config.model_type = "my_new_family"
    support = shared_prompt_support(model)
    assert not support.enabled and "'my_new_family') is not among the families tested exact" in support.reason


def on_a_gpu_with_torch_varlen_attn(monkeypatch):
    """Make this process look like a CUDA GPU (compute capability 9.0, no flash_attn package) whose fused varlen kernel
    is torch's `varlen_attn` in the signature that takes windows (a stand-in: nothing runs on it here)."""

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        return query

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: False)
    monkeypatch.setattr(torch_varlen, "varlen_attn", varlen_attn)


def test_no_fused_kernel_on_rocm(monkeypatch):
    """An allow-list: the fused kernels were compared with the plain layout on NVIDIA GPUs; ROCm reports itself as
    CUDA (and its architecture numbers passed the compute-capability gate), so it is named and left out."""
    on_a_gpu_with_torch_varlen_attn(monkeypatch)
    assert varlen.cuda_varlen_kernel("sdpa")[0] is not None  # the same machine as NVIDIA's
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    kernel, why = varlen.cuda_varlen_kernel("sdpa")
    assert kernel is None and why.startswith("ROCm: the fused varlen kernels are checked")


def automatic_layout_on_cuda(trainer, caplog) -> bool:
    """The trainer's automatic layout decided again as on a CUDA device in bf16: whether it takes the shared-prompt
    layout (the reason for a plain one is logged, into `caplog`)."""
    trainer._layout_checked, trainer.data_collator.shared_prompt, trainer.args.bf16 = False, False, True
    with (patch.object(type(trainer.accelerator), "device", new_callable=PropertyMock) as device,
          caplog.at_level(logging.WARNING, logger="nca_trl")):
        device.return_value = torch.device("cuda")
        trainer._setup_layout()
    return trainer.data_collator.shared_prompt


@pytest.mark.slow
def test_heads_wider_than_the_fused_kernels_take(tokenizer, vicuna, tmp_path, monkeypatch, caplog):
    """Gemma 4's global layers have 512-wide heads, which no fused varlen kernel takes (flash-attention and torch's
    varlen_attn stop at 256). On a CPU the PyTorch paths run them (the family test checks the log-probs); on a GPU the
    automatic layout is plain at construction, said once, and a forced one runs those layers' calls on the padded SDPA
    path, the others on the fused kernel, instead of failing inside the kernel at the first step."""
    model_type, overrides = FAMILIES["gemma4"]
    monkeypatch.setitem(FAMILIES, "gemma4", (model_type, {**overrides, "global_head_dim": 256}))
    assert "wide_heads" not in attention_variants(build("gemma4"))
    monkeypatch.setitem(FAMILIES, "gemma4", (model_type, overrides))
    trainer = trainer_for("gemma4", tokenizer, vicuna, tmp_path)
    assert trainer.data_collator.shared_prompt and "wide_heads" in attention_variants(trainer.model)
    monkeypatch.setattr(varlen, "_selected", {})
    logps_both_layouts(trainer)  # each call says whether its heads are wide: the 512-wide and the 16-wide layers
    assert sorted("wide_heads" in needs for _, _, _, needs, _ in varlen._selected) == [False, True]

    on_a_gpu_with_torch_varlen_attn(monkeypatch)
    kernel, why = varlen.cuda_varlen_kernel("sdpa", needs=frozenset({"sliding_window", "wide_heads"}))
    wide = "wide_heads (heads wider than 256 dimensions, not a multiple of 8, or values wider than queries)"
    assert kernel is None and f"does not implement {wide}" in why
    monkeypatch.setattr(varlen, "_selected", {})
    cuda = torch.device("cuda")
    assert varlen.select_kernel(cuda, torch.bfloat16, "sdpa", frozenset({"sliding_window"})).cuda
    assert varlen.select_kernel(cuda, torch.bfloat16, "sdpa", frozenset({"wide_heads"})).fn is varlen.padded_varlen
    assert not automatic_layout_on_cuda(trainer, caplog)
    assert "Plain padded layout (shared_prompt=None, automatic): torch.nn.attention.varlen.varlen_attn: does not " \
           f"implement {wide}" in caplog.text


@pytest.mark.parametrize("forced, family, reason", [
    ("padded", "gpt_oss", "NCA_TRL_VARLEN_KERNEL=padded: padded_varlen (causal SDPA on the prompts, masked SDPA on the "
                          "completions) does not implement sinks, which this model's attention uses: unset it"),
    ("flash_attn", "llama", "NCA_TRL_VARLEN_KERNEL=flash_attn needs CUDA and float16/bfloat16, and training runs on "
                            "cpu in float32"),
    ("fast", "llama", "NCA_TRL_VARLEN_KERNEL='fast': expected one of flash_attn, torch, reference, padded"),
])
def test_a_forced_kernel_that_cannot_run_the_model_is_found_at_construction(forced, family, reason, tokenizer, vicuna,
                                                                           tmp_path, monkeypatch, caplog):
    """`NCA_TRL_VARLEN_KERNEL` forcing a kernel that cannot run the model here: the automatic layout is plain, said
    once, and `shared_prompt=True` is refused, both at construction (the layout was taken and the first forward
    raised before)."""
    monkeypatch.setenv(varlen.KERNEL_ENV, forced)
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        trainer = trainer_for(family, tokenizer, vicuna, tmp_path)
    assert not trainer.data_collator.shared_prompt
    assert f"Plain padded layout (shared_prompt=None, automatic): {reason}" in caplog.text
    with pytest.raises(ValueError, match="cannot run here, or not exactly: " + re.escape(reason)):
        trainer_for(family, tokenizer, vicuna, tmp_path / "explicit", shared_prompt=True)
    monkeypatch.setenv(varlen.KERNEL_ENV, "reference")  # one that runs every variant: the layout, exact
    trainer = trainer_for(family, tokenizer, vicuna, tmp_path / "reference")
    plain, own, _ = logps_both_layouts(trainer)
    assert trainer.data_collator.shared_prompt
    torch.testing.assert_close(own, plain, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family, variants", [("gemma2", "sliding_window"), ("gpt_oss", "sinks and sliding_window")])
def test_a_shared_prompt_forward_whose_attention_missed_a_variant_raises(family, variants):
    """`shared_prompt_forward` compares the variants the attention calls were given with those the model uses (its
    config's window, its modules' sinks): here no call was made at all, so every variant is missing. Softcapping is
    not asked for: only a call's keyword applies it, in either layout."""
    model = build(family)
    with pytest.raises(RuntimeError, match=f"attention uses {variants} .* Set shared_prompt=False"):
        with shared_prompt_forward(model):
            pass
    with shared_prompt_forward(build("llama")):  # nothing to apply, nothing missing
        pass


@pytest.mark.slow
def test_an_attention_module_that_bypasses_the_layout_raises(tokenizer, vicuna, tmp_path):
    """An attention module that computes its attention without the routed implementation (here one holding its own
    config, with sdpa) would attend over the whole row; the forward check finds the module that never ran with the
    layout."""
    trainer = trainer_for("llama", tokenizer, vicuna, tmp_path)
    assert trainer.data_collator.shared_prompt
    attention = trainer.model.model.layers[1].self_attn
    attention.config = copy.copy(attention.config)
    attention.config._attn_implementation = "sdpa"
    with pytest.raises(RuntimeError, match="LlamaAttention ran without the shared-prompt layout .* Set "
                                           "shared_prompt=False"):
        logps_both_layouts(trainer)

    # An attention module swapped in after construction (without the forward check's hook until the next forward)
    trainer = trainer_for("llama", tokenizer, vicuna, tmp_path / "swapped")
    layer = trainer.model.model.layers[1]
    swapped = type(layer.self_attn)(copy.copy(layer.self_attn.config), layer_idx=1)
    swapped.config._attn_implementation = "sdpa"
    swapped.load_state_dict(layer.self_attn.state_dict())
    layer.self_attn = swapped
    with pytest.raises(RuntimeError, match="LlamaAttention ran without the shared-prompt layout"):
        logps_both_layouts(trainer)


def _shared_logps(trainer, forward_model=None):
    """The policy's per-completion log-probs `[N]` on the train rows in the shared-prompt layout, forwarded through
    `forward_model` (default: the policy) under the trainers' checks."""
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    assert trainer.data_collator.shared_prompt
    return trainer._sequence_logps(forward_model or trainer.model, batch)[-1]


@pytest.mark.slow
def test_attention_modules_that_do_not_run_are_not_asked_for(tokenizer, vicuna, tmp_path, monkeypatch):
    """The forward check asks only the attention modules that ran: OPT's `layerdrop` skips whole layers in training
    (for the whole row, so the layout stays exact), GPT-BigCode's cross-attention (`add_cross_attention`, causal)
    never runs without encoder states. Both raised "did not run with the shared-prompt layout" before."""
    monkeypatch.setitem(FAMILIES, "opt", ("opt", dict(num_hidden_layers=4, layerdrop=0.5)))
    trainer = trainer_for("opt", tokenizer, vicuna, tmp_path)
    trainer.model.train()
    torch.manual_seed(0)
    for _ in range(4):  # some layers dropped in some of these forwards
        with torch.no_grad():
            assert torch.isfinite(_shared_logps(trainer)).all()

    monkeypatch.setitem(FAMILIES, "gpt_bigcode", ("gpt_bigcode", dict(num_hidden_layers=2, multi_query=False,
                                                                      add_cross_attention=True)))
    trainer = trainer_for("gpt_bigcode", tokenizer, vicuna, tmp_path / "bigcode")
    plain, own, _ = logps_both_layouts(trainer)
    torch.testing.assert_close(own, plain, rtol=1e-5, atol=0)


@pytest.mark.slow
def test_attention_dropout_in_training_takes_a_kernel_that_applies_it(tokenizer, vicuna, tmp_path, monkeypatch, caplog):
    """GPT-BigCode (StarCoder 1) passes its `attn_pdrop` to the attention in training, a float that TRL's
    `disable_dropout` (nn.Dropout modules only) left on, in DPOTrainer too; Seed-OSS its `attention_dropout` (0.1 by
    default). `disable_dropout` (the default) now zeroes those too. With `disable_dropout=False` the automatic layout
    is plain wherever the policy applies dropout in training (the shared-prompt row would give a prompt's K
    completions one dropout noise, the plain layout K independent ones); with `shared_prompt=True` the shared-prompt
    attention asks for a kernel that applies it, and on a GPU whose fused kernel has none (torch's varlen_attn) a
    reference left in train mode makes the automatic layout plain at construction: the first training step raised
    there."""
    monkeypatch.setitem(FAMILIES, "gpt_bigcode", ("gpt_bigcode", dict(num_hidden_layers=2, attn_pdrop=0.5)))
    default = trainer_for("gpt_bigcode", tokenizer, vicuna, tmp_path / "default")
    assert default.data_collator.shared_prompt and "dropout" not in attention_variants(default.model)
    assert "dropout" not in attention_variants(default.ref_model)
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        automatic = trainer_for("gpt_bigcode", tokenizer, vicuna, tmp_path / "automatic", disable_dropout=False)
    assert not automatic.data_collator.shared_prompt
    assert "the policy applies dropout in training, at transformer.drop (p=0.1)" in caplog.text  # embd_pdrop
    trainer = trainer_for("gpt_bigcode", tokenizer, vicuna, tmp_path, shared_prompt=True, disable_dropout=False)
    assert trainer.data_collator.shared_prompt and "dropout" in attention_variants(trainer.model)
    gpt2 = trainer_for("gpt2", tokenizer, vicuna, tmp_path / "gpt2")  # attn_pdrop 0.1 in an nn.Dropout: zeroed
    assert "dropout" not in attention_variants(gpt2.model) and "dropout" in attention_variants(build("gpt2"))
    asked = []
    select = varlen.select_kernel
    monkeypatch.setattr("nca_trl.shared_prompt.packing.select_kernel",
                        lambda *args: asked.append(args[-1]) or select(*args))
    plain, own, _ = logps_both_layouts(trainer)  # eval: no dropout, the plain log-probs
    torch.testing.assert_close(own, plain, rtol=1e-5, atol=0)
    assert asked and not any("dropout" in needs for needs in asked)
    trainer.model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        first, second = _shared_logps(trainer), _shared_logps(trainer)
    assert asked[-1] == {"dropout"} and torch.isfinite(first).all() and not torch.equal(first, second)

    on_a_gpu_with_torch_varlen_attn(monkeypatch)  # which has no dropout
    trainer.args.shared_prompt = None  # the automatic choice from here on
    assert not automatic_layout_on_cuda(trainer, caplog)
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(trainer.model)  # the reference's dropout alone: it runs in eval mode
    for module in attention_modules(trainer.model):
        module.attn_dropout = module.attn_pdrop = 0.0
    assert automatic_layout_on_cuda(trainer, caplog)
    trainer.ref_model.train()  # a reference a user left in train mode applies its dropout: it counts then
    assert not automatic_layout_on_cuda(trainer, caplog)
    assert "Plain padded layout (shared_prompt=None, automatic): torch.nn.attention.varlen.varlen_attn: does not " \
           "implement dropout" in caplog.text


@pytest.mark.slow
def test_module_copies_check_themselves(tokenizer, vicuna, tmp_path):
    """`nn.DataParallel` (which transformers' Trainer uses on several GPUs without a distributed launch) forwards
    replicas: new module objects sharing each module's hooks. The check follows the replicas, and their log-probs are
    the plain layout's (it raised on every replica before: their attention modules were not the model's)."""

    def replicate(module):  # what torch.nn.parallel.replicate does, on one device
        modules = list(module.modules())
        copies = {m: m._replicate_for_data_parallel() for m in modules}
        for m in modules:
            for name, child in m._modules.items():
                if child is not None:
                    setattr(copies[m], name, copies[child])
            for name, p in m._parameters.items():
                setattr(copies[m], name, None if p is None else p * 1)
        return copies[module]

    trainer = trainer_for("llama", tokenizer, vicuna, tmp_path)
    replica = replicate(trainer.model)
    assert replica.model.layers[0].self_attn is not trainer.model.model.layers[0].self_attn
    plain, _, _ = logps_both_layouts(trainer)
    with torch.no_grad():
        torch.testing.assert_close(_shared_logps(trainer, replica), plain, rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_window_the_config_does_not_declare_but_the_attention_gets(implementation, tokenizer, vicuna, tmp_path,
                                                                     monkeypatch):
    """OLMoE's attention passes `getattr(config, "sliding_window", None)` on, though its config class declares none and
    its mask applies none: eager and sdpa attend without a window in the plain layout, and so does the shared-prompt
    layout now (it applied the window: 3e-2 relative off, silently, before)."""
    monkeypatch.setitem(FAMILIES, "olmoe", ("olmoe", dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                                          sliding_window=WINDOW, attn_implementation=implementation)))
    trainer = trainer_for("olmoe", tokenizer, vicuna, tmp_path)
    assert trainer.data_collator.shared_prompt
    plain, own, _ = logps_both_layouts(trainer)
    torch.testing.assert_close(own, plain, rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "phi3"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_layer_types_key_the_family_does_not_read_keeps_the_window(family, implementation, tokenizer, vicuna,
                                                                     tmp_path, monkeypatch):
    """Mistral's and Phi3's masks take the window from `sliding_window` alone; a `layer_types` key a converted
    config.json carries (all full attention) is not theirs. The shared-prompt layout keeps the window as the plain
    mask does (it dropped it: 5.9e-2 relative off on Mistral, silently, before)."""
    model_type, overrides = FAMILIES[family]
    monkeypatch.setitem(FAMILIES, family, (model_type, {**overrides, "layer_types": ["full_attention"] * 2,
                                                        "attn_implementation": implementation}))
    trainer = trainer_for(family, tokenizer, vicuna, tmp_path)
    assert trainer.model.config.layer_types == ["full_attention"] * 2 and trainer.data_collator.shared_prompt
    plain, own, batch = logps_both_layouts(trainer)
    torch.testing.assert_close(own, plain, rtol=1e-5, atol=0)
    assert int(batch["max_seqlen_k"]) > 2 * WINDOW


@pytest.mark.slow
def test_softcapping_the_attention_never_gets_is_not_asked_for(tokenizer, vicuna, tmp_path, monkeypatch):
    """Gemma 3's attention keeps `attn_logit_softcapping` but passes none to its kernel, so the plain layout applies
    none: the shared-prompt forward agrees and does not raise (it raised "attention uses softcap" at every forward
    before)."""
    model_type, overrides = FAMILIES["gemma3"]
    monkeypatch.setitem(FAMILIES, "gemma3", (model_type, {**overrides, "attn_logit_softcapping": 50.0}))
    trainer = trainer_for("gemma3", tokenizer, vicuna, tmp_path)
    assert trainer.model.config.attn_logit_softcapping == 50.0 and trainer.data_collator.shared_prompt
    plain, own, _ = logps_both_layouts(trainer)
    torch.testing.assert_close(own, plain, rtol=1e-5, atol=0)


def test_an_attention_module_with_a_config_of_its_own_is_plain():
    """PEFT's `modules_to_save` trains a deep copy of a module, its config copied too: routing the model's attention
    would not reach the copy, which would attend over the whole row. Plain, decided at construction, named."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["gate_proj"], modules_to_save=["self_attn"]))
    support = shared_prompt_support(model)
    assert not support.enabled and "LlamaAttention holds a config of its own (a copy, as PEFT's" in support.reason
    assert shared_prompt_support(get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj"]))).enabled


@pytest.mark.parametrize("implementation, shared", [("eager", False), ("sdpa", True)])
def test_gpt2_upcast_and_reordered_attention_stays_plain_with_eager(implementation, shared, monkeypatch):
    """GPT-2's eager attention with `reorder_and_upcast_attn` computes in float32 in its own code, which routing the
    attention would skip, for plain batches too (1.2e-4 relative in bf16): plain, named. sdpa ignores the setting."""
    monkeypatch.setitem(FAMILIES, "gpt2", ("gpt2", dict(num_hidden_layers=2, reorder_and_upcast_attn=True,
                                                        attn_implementation=implementation)))
    support = shared_prompt_support(build("gpt2"))
    assert support.enabled is shared
    assert shared or "reorder_and_upcast_attn=True with eager attention" in support.reason


def test_multimodal_models_not_tested_are_plain(monkeypatch):
    """A multimodal model takes the layout only where its model type was tested exact on text (`EXACT_MULTIMODAL`),
    however exact its language model's family is."""
    model = build("gemma3_multimodal")
    assert shared_prompt_support(model).enabled
    monkeypatch.delitem(EXACT_MULTIMODAL, "gemma3")
    support = shared_prompt_support(model)
    assert not support.enabled and "multimodal model Gemma3ForConditionalGeneration (model type 'gemma3') is not " \
        "among those tested exact" in support.reason


def test_bidirectional_attention_is_plain(monkeypatch):
    """Gemma 3 with `use_bidirectional_attention` (EmbeddingGemma) is an allowed family whose attention is not causal:
    plain, since the layout's attention is causal."""
    model_type, overrides = FAMILIES["gemma3"]
    monkeypatch.setitem(FAMILIES, "gemma3", (model_type, {**overrides, "use_bidirectional_attention": True}))
    support = shared_prompt_support(build("gemma3"))
    assert not support.enabled and "Gemma3Attention is not causal" in support.reason


def test_attention_variants_each_family_needs():
    """What a kernel must implement for each family: windows only where one is shorter than max_length."""
    needs = {f: shared_prompt_support(build(f), MAX_LENGTH).needs for f in ("llama", "mistral", "gemma2", "gpt_oss")}
    assert needs == {
        "llama": frozenset(), "mistral": {"sliding_window"}, "gemma2": {"sliding_window", "softcap"},
        "gpt_oss": {"sliding_window", "sinks"},
    }
    assert shared_prompt_support(build("mistral"), max_length=WINDOW).needs == frozenset()  # the window never binds


@pytest.mark.slow
@pytest.mark.parametrize("config_cls", [DPOConfig, NCAConfig])
def test_compute_metrics_takes_the_plain_layout(config_cls, tiny_mistral, vicuna, tmp_path, caplog):
    """`compute_metrics` gets padded logits (`return_outputs=True`): automatic -> plain, logged; it trains and
    evaluates with a plain `DPOConfig`. An explicit `shared_prompt=True` with it is refused at construction."""
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"logit_mean": float(prediction.predictions.mean())}

    args = make_args(config_cls, tmp_path, max_steps=2, max_length=64, eval_strategy="steps", eval_steps=2)
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=vicuna.select(range(4)),
                             eval_dataset=vicuna.select(range(4, 6)), compute_metrics=compute_metrics)
    assert not trainer.data_collator.shared_prompt
    assert "compute_metrics takes each sequence's padded logits" in caplog.text
    trainer.train()
    metrics = trainer.evaluate()
    assert seen and "eval_logit_mean" in metrics and torch.isfinite(torch.tensor(metrics["eval_loss"]))

    if config_cls is NCAConfig:
        with pytest.raises(ValueError, match="`shared_prompt=True` .* compute_metrics takes each sequence's padded"):
            NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path, shared_prompt=True),
                       train_dataset=vicuna.select(range(4)), compute_metrics=compute_metrics)


def test_predict_returns_padded_logits_from_a_shared_prompt_trainer(tiny_mistral, vicuna, tmp_path):
    """`Trainer.predict` needs each sequence's logits too: its batches take the plain layout; training's stays."""
    trainer = NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path, max_length=64),
                         train_dataset=vicuna.select(range(4)))
    assert trainer.data_collator.shared_prompt
    output = trainer.predict(trainer.train_dataset.select(range(2)))
    assert output.predictions.ndim == 3 and output.predictions.shape[-1] == trainer.model.config.vocab_size
    assert trainer.data_collator.shared_prompt


@pytest.mark.slow
def test_predict_and_evaluate_take_raw_rows_as_construction_does(tiny_mistral, vicuna, tmp_path):
    """`predict` on raw rated rows raised KeyError 'completion_ids' in the collator (only `rewards` reached it);
    now prepared as `evaluate` prepares them, with precomputed reference log-probs too. An `images` column given to
    `evaluate` or `predict` is refused as at construction (it was evaluated on the text, without a word)."""
    raw = vicuna.select(range(2, 4))
    for precompute in (False, True):
        trainer = NCATrainer(model=tiny_mistral, train_dataset=vicuna.select(range(2)), eval_dataset=raw,
                             args=make_args(NCAConfig, tmp_path / str(precompute), max_length=64,
                                            precompute_ref_log_probs=precompute))
        prepared, given = trainer.predict(trainer.eval_dataset), trainer.predict(raw)
        assert given.predictions.shape == prepared.predictions.shape and given.predictions.shape[0] == 8
        assert given.metrics["test_loss"] == pytest.approx(prepared.metrics["test_loss"], rel=1e-6)
        images = raw.add_column("images", [[]] * len(raw))
        for call in (trainer.evaluate, trainer.predict, lambda d: trainer.evaluate({"v": d})):
            with pytest.raises(ValueError, match="vision-related .* has the column 'images'"):
                call(images)

@pytest.mark.slow
def test_non_padding_tokens_seen_count_every_token_of_a_shared_prompt_row(tiny_mistral, vicuna, tmp_path):
    """`include_num_input_tokens_seen="non_padding"` counted a shared-prompt row's tokens other than the pad id, which
    is EOS here: each completion's EOS went uncounted (3932 of 3940 tokens)."""
    data = vicuna.select(range(2))
    seen = {}
    for mode in ("all", "non_padding"):
        trainer = NCATrainer(model=tiny_mistral, train_dataset=data, args=make_args(
            NCAConfig, tmp_path / mode, max_steps=1, max_length=None, include_num_input_tokens_seen=mode))
        assert trainer.data_collator.shared_prompt
        trainer.train()
        seen[mode] = trainer.state.num_input_tokens_seen
    rows = trainer.train_dataset  # the row holds each prompt once, its last token again before each completion
    assert seen["non_padding"] == seen["all"] == sum(len(p) + sum(map(len, c)) + len(c) - 1
                                                     for p, c in zip(rows["prompt_ids"], rows["completion_ids"]))

def test_predict_returns_every_completion_of_a_last_uneven_batch(tiny_mistral, vicuna, tmp_path):
    """Without compute_metrics, `predict` gathered its logits with accelerate's gather_for_metrics, which cut a last
    batch's completion rows to its number of prompts (7 of 8 rows for K = 3, 3, 2 in batches of 2), and on 2 processes
    gloo aborted on batches of different numbers of completions (tests/streaming_run.py)."""
    rows = vicuna.select(range(3)).to_list()
    for row, k in zip(rows, (3, 3, 2)):
        row["completions"], row["rewards"] = row["completions"][:k], row["rewards"][:k]
    trainer = NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path, max_length=64),
                         train_dataset=vicuna.select(range(2)))
    assert trainer.predict(Dataset.from_list(rows)).predictions.shape[0] == 8
    # A score per completion (1-D, from `preprocess_logits_for_metrics`) is rows of completions too: cut to 6 of 9
    # (K = 2, 3, 4) when every 1-D tensor was taken for the repeated loss
    for row, k in zip(rows, (2, 3, 4)):
        row["completions"], row["rewards"] = vicuna[0]["completions"][:k], vicuna[0]["rewards"][:k]
    trainer.preprocess_logits_for_metrics = lambda logits, labels: logits.float().mean(dim=(1, 2))
    output = trainer.predict(Dataset.from_list(rows))
    assert output.predictions.shape == (9,) and output.label_ids.shape[0] == 9

def test_predict_loss_is_the_mean_over_prompts_as_evaluate_gives(tiny_mistral, tiny_mistral_ref, vicuna, tmp_path):
    """`predict`'s `test_loss` weighed a last batch of 1 prompt as 2: Trainer gathers a batch's loss repeated to the
    batch size (`[2]`), which our gather of completion rows took for the last batch's 2 completions (K = 2) and kept
    whole, where accelerate's cuts it to the 1 real prompt (1.387119 where `evaluate` gave 1.386998 on the same rows).
    Now 1-D tensors are never rows of completions, and `predict`'s loss is the mean over prompts, as `eval_loss`."""
    from transformers import AutoModelForCausalLM

    rows = vicuna.select(range(3)).to_list()
    for row, k in zip(rows, (2, 3, 2)):
        row["completions"], row["rewards"] = row["completions"][:k], row["rewards"][:k]
    rows = Dataset.from_list(rows)
    trainer = NCATrainer(model=tiny_mistral, ref_model=AutoModelForCausalLM.from_pretrained(tiny_mistral_ref),
                         args=make_args(NCAConfig, tmp_path, max_length=64), train_dataset=vicuna.select(range(2)),
                         eval_dataset=rows)
    pool = trainer._pooled["eval"]
    evaluated = trainer.evaluate()["eval_loss"]
    predicted = trainer.predict(rows, metric_key_prefix="heldout").metrics["heldout_loss"]
    assert predicted == pytest.approx(evaluated, rel=1e-6) and not pool.sums  # left empty
    one_batch = NCATrainer(model=tiny_mistral, ref_model=AutoModelForCausalLM.from_pretrained(tiny_mistral_ref),
                           args=make_args(NCAConfig, tmp_path, max_length=64, per_device_eval_batch_size=3),
                           train_dataset=vicuna.select(range(2)))
    assert one_batch.predict(rows).metrics["test_loss"] == pytest.approx(predicted, rel=1e-6)


def test_a_late_compute_metrics_with_persistent_eval_workers(tiny_mistral, vicuna, tmp_path):
    """The cached evaluation loader of `dataloader_persistent_workers` kept its workers' copy of the shared-prompt
    collator, so the plain batches a late `compute_metrics` needs never came ("`return_outputs=True` needs each
    sequence's padded logits"): the loader is rebuilt for the other layout."""
    trainer = NCATrainer(model=tiny_mistral, train_dataset=vicuna.select(range(2)), eval_dataset=vicuna.select(range(2, 4)),
                         args=make_args(NCAConfig, tmp_path, max_length=64, dataloader_num_workers=1,
                                        dataloader_persistent_workers=True))
    before = trainer.evaluate()  # its loader and worker are kept
    trainer.compute_metrics = lambda prediction: {"rows": float(prediction.predictions.shape[0])}
    after = trainer.evaluate()
    assert after["eval_rows"] == 8 and after["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-5)


def test_the_layout_follows_a_given_collators_truncation_mode(tiny_mistral, vicuna, tmp_path, caplog):
    """A `DataCollatorForRatedCompletions(truncation_mode="keep_end")` passed as `data_collator` with the config's
    default `keep_start`: the layout read the config's, took the shared-prompt row, which cuts keep_start, and
    trained other numbers than the plain layout (loss 1.398 vs 1.383), silently."""
    from transformers import AutoTokenizer

    from nca_trl.data import DataCollatorForRatedCompletions

    pad = AutoTokenizer.from_pretrained(tiny_mistral).eos_token_id
    collator = DataCollatorForRatedCompletions(pad_token_id=pad, max_length=64, truncation_mode="keep_end")
    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        trainer = NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path, max_length=64),
                             train_dataset=vicuna.select(range(2)), data_collator=collator)
    assert not trainer.data_collator.shared_prompt and "truncation_mode='keep_end'" in caplog.text


def test_a_prompt_with_no_token_takes_the_plain_layout_for_its_batch(tiny_mistral, tmp_path, caplog, monkeypatch):
    """A tokenizer without BOS (Qwen2's, GPT-2's) and a prompt whose text merges into its completions' first tokens:
    TRL's boundary rule leaves the prompt no token, which the shared-prompt row cannot share, and training stopped
    at that batch. Such a batch now takes the plain layout: the same loss as `shared_prompt=False`."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from nca_trl.data import collator

    monkeypatch.setitem(collator._warned, "empty_prompt", False)  # said once per process
    rows = [{"prompt": "Hel", "completions": ["lo world", "p me please"], "rewards": [1.0, 0.0]},
            {"prompt": "Say", "completions": [" yes", " no"], "rewards": [1.0, 0.0]}]
    losses = {}
    for layout in (None, False):
        tokenizer = AutoTokenizer.from_pretrained(tiny_mistral)
        tokenizer.add_bos_token = False
        trainer = NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path / str(layout), max_steps=1,
                                                                 shared_prompt=layout, learning_rate=0.0),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        assert trainer.data_collator.shared_prompt is (layout is None) and [] in trainer.train_dataset["prompt_ids"]
        with caplog.at_level(logging.WARNING, logger="nca_trl"):
            losses[layout] = trainer.train().training_loss
    assert losses[None] == pytest.approx(losses[False], rel=1e-6)
    assert "take the plain padded layout" in caplog.text


def test_predict_leaves_the_next_evaluations_metrics_alone(tiny_mistral, vicuna, tmp_path):
    """The metrics `predict`'s batches logged stayed and were averaged into the next evaluation's (eval_logps/chosen
    -755.3 -> -637.2; `trl.DPOTrainer` does the same)."""
    trainer = NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path, max_length=64),
                         train_dataset=vicuna.select(range(2)), eval_dataset=vicuna.select(range(2, 4)))
    before = trainer.evaluate()
    trainer.predict(trainer.train_dataset)
    after = trainer.evaluate()
    assert {k: v for k, v in after.items() if "runtime" not in k and "per_second" not in k} == pytest.approx(
        {k: v for k, v in before.items() if "runtime" not in k and "per_second" not in k}, rel=1e-6)


def test_compute_metrics_set_after_construction_evaluates_in_the_plain_layout(tiny_mistral, vicuna, tmp_path):
    """A pipeline that sets `trainer.compute_metrics` after construction, when training took the shared-prompt
    layout: its first evaluation stopped the run ("`return_outputs=True` needs each sequence's padded logits").
    Evaluation now takes the plain layout (the same loss as without `compute_metrics`); training's stays."""
    trainer = NCATrainer(model=tiny_mistral, args=make_args(NCAConfig, tmp_path, max_length=64),
                         train_dataset=vicuna.select(range(2)), eval_dataset=vicuna.select(range(2, 4)))
    assert trainer.data_collator.shared_prompt
    before = trainer.evaluate()
    trainer.compute_metrics = lambda prediction: {"rows": float(prediction.predictions.shape[0])}
    after = trainer.evaluate()
    assert after["eval_rows"] == 8 and after["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-5)
    assert trainer.data_collator.shared_prompt


@pytest.mark.slow
def test_gpu_family_check_dry_runs_on_the_cpu(tmp_path):
    """scripts/gpu_families.py (the GPU run's family agreement, bf16 with the fused kernel) cannot rot: its CPU dry run
    decides and compares as on a GPU, in float32."""
    import json

    from conftest import load_script

    out = tmp_path / "families.json"
    assert load_script("gpu_families").main(["--smoke", "--out", str(out), "--families", "gpt_oss,gemma2,lfm2"]) == 0
    result = json.loads(out.read_text())
    assert result["ok"] and {n: r["layout"] for n, r in result["families"].items()} == {
        "gpt_oss": "shared", "gemma2": "shared", "lfm2": "plain"}
    assert result["families"]["gpt_oss"]["needs"] == ["sinks", "sliding_window"]
    assert result["families"]["gemma2"]["shared_vs_plain"] <= 1e-5


def test_gpu_family_check_records_a_model_type_this_transformers_lacks(monkeypatch):
    """The device has an older transformers than this machine: a family it cannot have is recorded as not built (as
    the test above skips it), not counted as a disagreement."""
    from conftest import load_script

    monkeypatch.setitem(FAMILIES, "future", ("model_type_of_a_later_transformers", {}))
    result = load_script("gpu_families").family_agreement("future", "cpu", smoke=True)
    assert result == {"layout": "not built", "ok": True,
                      "reason": "this transformers has no model type 'model_type_of_a_later_transformers'"}


@pytest.mark.parametrize("family", ["qwen2_5_vl_multimodal", "qwen3_vl_multimodal"])
def test_multimodal_rotary_positions_reach_the_language_model(family, tokenizer, vicuna, tmp_path):
    """Qwen2.5-VL and Qwen3-VL compute their own (three-row) positions when given none: the shared-prompt row's
    positions, which restart after each prompt, must reach their rotary embedding. The family test's agreement with the
    plain layout would not show it if they did not matter: with the row's plain 0..T-1 instead, 1e-2 relative off."""
    trainer = trainer_for(family, tokenizer, vicuna, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert trainer.data_collator.shared_prompt
    with torch.no_grad():
        own = trainer._sequence_logps(trainer.model, batch)[-1]
        whole_row = {**batch, "position_ids": torch.arange(batch["input_ids"].size(1))[None]}
        wrong = trainer._sequence_logps(trainer.model, whole_row)[-1]
    assert ((own - wrong).abs() / own.abs()).max() > 1e-3


def test_the_run_names_the_class_that_loads_the_saved_model():
    """A Mistral 3 checkpoint (Mistral Small 3.x, Magistral, Ministral 3) is a `Mistral3ForConditionalGeneration`, as
    TRL loads it, which `AutoModelForCausalLM` does not load: the end-of-run summary and run_info.json named
    `AutoModelForCausalLM.from_pretrained` for every saved model."""
    from transformers import AutoModelForImageTextToText

    from nca_trl.runtime.models import loader_of

    assert loader_of(build("llama")) == loader_of(build("gemma3_multimodal")) == "AutoModelForCausalLM"
    model = build("mistral3_multimodal")
    assert loader_of(model) == "AutoModelForImageTextToText"
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_config(model.config)
    assert type(AutoModelForImageTextToText.from_config(model.config)) is type(model)

    # Under FSDP2, `fully_shard` subclasses the model's class as FSDP<name> (it named `FSDPMistral3For...` before)
    from torch.distributed.fsdp import FSDPModule

    model.__class__ = type(f"FSDP{type(model).__name__}", (FSDPModule, type(model)), {})
    assert loader_of(model) == "AutoModelForImageTextToText"

    # Remote code: the auto classes its config maps (Qwen 1's `QWenLMHeadModel` was named as if transformers had it)
    class QWenLMHeadModel:
        config = SimpleNamespace(model_type="qwen", auto_map={"AutoConfig": "c.QWenConfig",
                                                              "AutoModelForCausalLM": "m.QWenLMHeadModel"})

    class RemoteVisionLanguageModel:
        config = SimpleNamespace(model_type="remote_vl", auto_map={"AutoConfig": "c.C",
                                                                   "AutoModelForImageTextToText": "m.M"})

    for cls in (QWenLMHeadModel, RemoteVisionLanguageModel):
        cls.__module__ = "transformers_modules.remote.modeling_remote"  # where transformers puts a checkpoint's code
    assert loader_of(QWenLMHeadModel()) == "AutoModelForCausalLM"
    assert loader_of(RemoteVisionLanguageModel()) == "AutoModelForImageTextToText"
    # A built-in class whose checkpoint keeps the auto_map of its remote-code days: its type decides, as it loads
    model.config.auto_map = {"AutoConfig": "configuration_m.C", "AutoModel": "modeling_m.M"}
    assert loader_of(model) == "AutoModelForImageTextToText"
