"""Models whose `base_model_prefix` names no submodule, through TRL's fused LM head (`nca_trl.runtime.backbone`).

Llama 4's and Llama 3.2 Vision's language models failed at the first forward, in `trl.DPOTrainer` as in these
trainers ("'MoeCausalLMOutputWithPast' object has no attribute 'last_hidden_state'"): they train now, loaded from a
path as a user passes it, with the log-probs of the model's own logits. The multimodal Llama 4 (what TRL loads for
Scout / Maverick) is refused at construction, naming how to train its language model, and that way trains.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM

from nca_trl import NCAConfig, NCATrainer
from nca_trl.data.collator import DataCollatorForRatedCompletions

from model_families import WIDTH

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TEXT = {  # class name -> (model_type, config overrides): attention chunks and cross-attention layers included
    "Llama4ForCausalLM": ("llama4_text", dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=1,
                                              intermediate_size_mlp=128, attention_chunk_size=16)),
    "MllamaForCausalLM": ("mllama_text_model", dict(num_hidden_layers=2, cross_attention_layers=[1], bos_token_id=1,
                                                    eos_token_id=2, pad_token_id=None)),
}
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64)


def save(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def text_model(name: str, tokenizer, path) -> str:
    """Path of a tiny random `name` (seed 0) with the Mistral tokenizer."""
    import transformers

    model_type, overrides = TEXT[name]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**WIDTH, **overrides})
    return save(getattr(transformers, name)(config), tokenizer, path)


def rows(vicuna) -> Dataset:
    return Dataset.from_list([{**r, "completions": r["completions"][:3], "rewards": r["rewards"][:3]}
                              for r in vicuna.select(range(4)).to_list()])


def args(tmp_path, **kwargs) -> NCAConfig:
    return NCAConfig(**{**dict(output_dir=str(tmp_path / "out"), report_to="none", max_length=48, use_cpu=True,
                               per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, save_strategy="no",
                               logging_steps=1), **kwargs})


def own_logps(model, batch) -> torch.Tensor:
    """Per-completion log-probs `[N]` from the model's own forward (its LM head on its own hidden states)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    tokens = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (tokens * batch["completion_mask"][:, 1:]).sum(dim=1)


@pytest.mark.parametrize("name", sorted(TEXT))
def test_a_language_model_without_a_backbone_prefix_trains(name, tokenizer, vicuna, tmp_path):
    import transformers

    path = text_model(name, tokenizer, tmp_path / "model")
    trainer = NCATrainer(model=path, args=args(tmp_path), train_dataset=rows(vicuna), processing_class=tokenizer)
    assert type(trainer.model).__name__ == name and type(trainer.ref_model).__name__ == name  # loaded by TRL
    assert trainer.model.base_model is trainer.model.model and trainer.ref_model.base_model is trainer.ref_model.model
    assert getattr(transformers, name).base_model_prefix == "language_model"  # the class is untouched

    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = DataCollatorForRatedCompletions(trainer.data_collator.pad_token_id, 48)(examples)
    with torch.no_grad():
        fused = trainer._sequence_logps(trainer.model, batch)[-1]
    torch.testing.assert_close(fused, own_logps(trainer.model, batch), rtol=1e-5, atol=1e-5)

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())

    trainer.save_model(str(tmp_path / "saved"))  # the saved model is the trained one, reloaded by its class
    reloaded = getattr(transformers, name).from_pretrained(tmp_path / "saved")
    trained = trainer.model.state_dict()
    assert reloaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(t, trained[k]) for k, t in reloaded.state_dict().items())


@pytest.mark.slow
def test_a_language_model_without_a_backbone_prefix_trains_a_lora_adapter(tokenizer, vicuna, tmp_path):
    from peft import LoraConfig

    path = text_model("Llama4ForCausalLM", tokenizer, tmp_path / "model")
    trainer = NCATrainer(model=path, args=args(tmp_path), train_dataset=rows(vicuna), processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert trainer.ref_model is None  # the reference is the policy with its adapter disabled
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if p.requires_grad)


def multimodal_llama4(tokenizer, path) -> str:
    from transformers import Llama4ForConditionalGeneration

    config = AutoConfig.for_model("llama4", text_config={**WIDTH, **TEXT["Llama4ForCausalLM"][1]},
                                  vision_config=_VISION)
    torch.manual_seed(0)
    return save(Llama4ForConditionalGeneration(config), tokenizer, path)


@pytest.mark.slow
def test_multimodal_llama4_is_refused_naming_its_language_model(tokenizer, vicuna, tmp_path):
    path = multimodal_llama4(tokenizer, tmp_path / "multimodal")
    with pytest.raises(ValueError, match=r"^The policy is a Llama4ForConditionalGeneration, whose `base_model_prefix` "
                       r"\('model'\) names no submodule.*Use its language model \(Llama4ForCausalLM, text only\) "
                       r"instead: `AutoModelForCausalLM.from_pretrained\(PATH\)` loads it"):
        NCATrainer(model=path, args=args(tmp_path), train_dataset=rows(vicuna), processing_class=tokenizer)

    # The fix it names: the language model alone, every weight of it loaded from the multimodal checkpoint
    language_model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(language_model).__name__ == "Llama4ForCausalLM" and not info["missing_keys"]
    trainer = NCATrainer(model=save(language_model, tokenizer, tmp_path / "text"), args=args(tmp_path, max_steps=1),
                         train_dataset=rows(vicuna), processing_class=tokenizer)
    trainer.train()
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_any_other_model_without_a_backbone_is_refused_at_construction(monkeypatch, tokenizer, tmp_path):
    import transformers

    from nca_trl.runtime import backbone

    path = text_model("MllamaForCausalLM", tokenizer, tmp_path / "model")
    monkeypatch.setattr(backbone, "LANGUAGE_BACKBONES", {})  # a class the allow-list does not name
    with pytest.raises(ValueError, match=r"^The reference model is a MllamaForCausalLM, whose `base_model_prefix` "
                       r"\('language_model'\) names no submodule, so TRL's fused LM head cannot find its language "
                       r"backbone and would fail at the first forward; TRL's DPOTrainer fails on it the same way\.$"):
        backbone.use_language_backbone(transformers.MllamaForCausalLM.from_pretrained(path), "reference model")


@pytest.mark.parametrize("setting", ["model_name_or_path", "ref_model_name_or_path"])
def test_nca_trl_train_refuses_a_multimodal_llama4_before_loading_it(setting, tokenizer, tmp_path, capsys,
                                                                     monkeypatch):
    """One line and exit 2, before any model is loaded (`from_pretrained` of a model would fail the test)."""
    from transformers import PreTrainedModel

    from test_preflight import refused, train_argv

    path = multimodal_llama4(tokenizer, tmp_path / "multimodal")
    model = tmp_path / "model" if setting == "ref_model_name_or_path" else path
    if setting == "ref_model_name_or_path":
        text_model("Llama4ForCausalLM", tokenizer, model)

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(never))
    extra = ["--ref_model_name_or_path", path] if setting == "ref_model_name_or_path" else []
    err = refused(train_argv(tmp_path, model, *extra), capsys)
    assert err.startswith(f"The model at `{setting}` ({path}) is a Llama4ForConditionalGeneration, whose "
                          "`base_model_prefix` ('model') names no submodule"), err
    assert "AutoModelForCausalLM.from_pretrained(PATH).save_pretrained(OUT)" in err and err.count("\n") == 1


def test_the_reference_pass_at_construction_finds_the_backbone(tokenizer, vicuna, tmp_path):
    """`precompute_ref_log_probs` runs the reference model through TRL's fused head inside `DPOTrainer.__init__`."""
    path = text_model("Llama4ForCausalLM", tokenizer, tmp_path / "model")
    trainer = NCATrainer(model=path, args=args(tmp_path, precompute_ref_log_probs=True, max_steps=1),
                         train_dataset=rows(vicuna), processing_class=tokenizer)
    ref_logps = trainer.train_dataset["ref_logps"]
    assert len(ref_logps) == 4 and all(math.isfinite(x) for row in ref_logps for x in row)
    trainer.train()
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_a_prepared_reference_model_finds_the_backbone(tokenizer, tmp_path):
    """TRL prepares the reference model in `__init__`: DeepSpeed's engine (which hands its module's attributes on, so
    `engine.base_model` looked like a backbone), FSDP2's `fully_shard` (which renames the class `FSDP<name>`)."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import Llama4ForCausalLM

    from nca_trl.runtime.backbone import use_language_backbone

    class Engine(torch.nn.DataParallel):  # a wrapper that hands attributes on to its module, as DeepSpeedEngine does
        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    path = text_model("Llama4ForCausalLM", tokenizer, tmp_path / "model")
    model = Llama4ForCausalLM.from_pretrained(path)
    use_language_backbone(Engine(model), "reference model")
    assert model.base_model is model.model
    model = Llama4ForCausalLM.from_pretrained(path)
    model.__class__ = type("FSDPLlama4ForCausalLM", (FSDPModule, Llama4ForCausalLM), {})  # what fully_shard does
    use_language_backbone(model, "reference model")
    assert model.base_model is model.model
