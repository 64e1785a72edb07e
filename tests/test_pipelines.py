"""nca-trl inside a pipeline that owns its config class (docs/pipelines.md): the alignment-handbook pattern, a
`DPOConfig` subclass with extra fields parsed by `TrlParser` from a YAML recipe, with the trainer swapped in one line
and, for `alpha`, the config class based on ours in one line."""

import logging
import math
from dataclasses import dataclass, field

import pytest
import torch
import yaml
from test_trainer import record_losses, short_prompts
from transformers.trainer_utils import get_last_checkpoint
import trl
from trl import DPOTrainer, ModelConfig, ScriptArguments, TrlParser

from nca_trl import InfoNCAConfig, InfoNCATrainer, NCAConfig, NCATrainer
from nca_trl.runtime.checkpoints import COMPLETE_MARKER


# The handbook's own config class (alignment/configs.py), as pipelines write it: trl.DPOConfig plus its own fields
@dataclass
class HandbookDPOConfig(trl.DPOConfig):
    chat_template: str | None = field(default=None, metadata={"help": "The chat template to use."})
    hub_model_revision: str | None = field(default="main", metadata={"help": "The Hub model branch to push to."})
    wandb_project: str | None = field(default=None, metadata={"help": "The project to store runs under."})


# The one-line change of docs/pipelines.md §2: the same class, based on the nca-trl config of the loss
@dataclass
class HandbookNCAConfig(NCAConfig):
    chat_template: str | None = field(default=None, metadata={"help": "The chat template to use."})
    hub_model_revision: str | None = field(default="main", metadata={"help": "The Hub model branch to push to."})
    wandb_project: str | None = field(default=None, metadata={"help": "The project to store runs under."})


@dataclass
class HandbookInfoNCAConfig(InfoNCAConfig):
    chat_template: str | None = field(default=None, metadata={"help": "The chat template to use."})
    hub_model_revision: str | None = field(default="main", metadata={"help": "The Hub model branch to push to."})
    wandb_project: str | None = field(default=None, metadata={"help": "The project to store runs under."})


def recipe(tmp_path, model, name, **fields):
    """A handbook-style YAML recipe (model, data and training fields in one file), parsed the way scripts/dpo.py does."""
    config = {
        "model_name_or_path": str(model),
        "dataset_name": "hh",
        "output_dir": str(tmp_path / name),
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        "hub_model_revision": "nca",
        "per_device_train_batch_size": 2,
        "max_length": 80,
        "learning_rate": 1.0e-3,
        "max_steps": 3,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "bf16": False,
        "use_cpu": True,
        "activation_checkpointing": False,
        "seed": 0,
        **fields,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def parse(config_class, path):
    return TrlParser((ScriptArguments, config_class, ModelConfig)).parse_args_and_config(args=["--config", str(path)])


@pytest.mark.slow
@pytest.mark.parametrize("ours,dpo_loss", [(NCATrainer, "nca_pair"), (InfoNCATrainer, "sigmoid")])
def test_handbook_config_trainer_swap_trains_trls_loss(ours, dpo_loss, tiny_mistral, hh, tmp_path, caplog):
    """The one-line trainer swap: the pipeline's own DPOConfig subclass, parsed from its YAML, trains our trainer with
    the same step losses as trl.DPOTrainer with the matching loss_type; the saved arguments name the loss trained."""
    data = short_prompts(hh, 4)
    losses = {}
    for trainer_class in (DPOTrainer, ours):
        _, training_args, model_args = parse(HandbookDPOConfig, recipe(tmp_path, tiny_mistral, trainer_class.__name__,
                                                                     loss_type=dpo_loss))
        assert training_args.chat_template.startswith("{% for") and training_args.hub_model_revision == "nca"
        with caplog.at_level(logging.WARNING, logger="nca_trl"):
            trainer = trainer_class(model=model_args.model_name_or_path, args=training_args, train_dataset=data)
        losses[trainer_class] = record_losses(trainer)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
        trainer.save_model()
        trainer.create_model_card(model_name="handbook-run")  # as the handbook's scripts/dpo.py does
    assert losses[ours] == pytest.approx(losses[DPOTrainer], abs=1e-5)
    assert abs(losses[ours][2] - losses[ours][0]) > 1e-3  # past the constant first step of the implicit reference

    loss = ours._config_class.loss
    said = [r.getMessage() for r in caplog.records if f"trains the {ours._name} loss" in r.getMessage()]
    assert len(said) == 1 and "HandbookDPOConfig" in said[0] and f"loss_type=['{dpo_loss}']" in said[0], caplog.text
    saved = torch.load(tmp_path / ours.__name__ / "training_args.bin", weights_only=False)
    assert type(saved) is HandbookDPOConfig and saved.loss_type == [loss] and saved.hub_model_revision == "nca"
    card = (tmp_path / ours.__name__ / "README.md").read_text()
    assert f"- {loss}\n" in card and "nca-trl" in card and "2402.05369" in card


@pytest.mark.slow
@pytest.mark.parametrize(
    "trainer_class,config_class", [(NCATrainer, HandbookNCAConfig), (InfoNCATrainer, HandbookInfoNCAConfig)]
)
def test_handbook_config_based_on_ours_exposes_alpha(trainer_class, config_class, tiny_mistral, hh, vicuna, tmp_path,
                                                      caplog):
    """The one-line config change: the recipe sets alpha, max_completions and loss_type; pairs stay one-hot (alpha
    said not to apply), and alpha weighs rated rows."""
    loss = config_class.loss
    path = recipe(tmp_path, tiny_mistral, "ours", loss_type=loss, alpha=0.5, max_completions=3, beta=0.1)
    _, training_args, model_args = parse(config_class, path)
    assert (training_args.alpha, training_args.max_completions, training_args.beta) == (0.5, 3, 0.1)
    assert training_args.loss_type == [loss] and training_args.chat_template.startswith("{% for")

    with caplog.at_level(logging.WARNING, logger="nca_trl"):
        trainer = trainer_class(model=model_args.model_name_or_path, args=training_args,
                                train_dataset=short_prompts(hh, 4))
    said = [r.getMessage() for r in caplog.records if "does not apply" in r.getMessage()]
    assert len(said) == 1 and "alpha=0.5" in said[0]
    losses = record_losses(trainer)
    trainer.train()
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    # Rated rows through the same config: capped to max_completions, with the recipe's alpha
    rated = trainer_class(model=model_args.model_name_or_path, args=training_args, train_dataset=vicuna.select(range(2)))
    assert rated.alpha == 0.5 and all(len(r) == 3 for r in rated.train_dataset["completion_ids"])


def test_errors_name_the_loss_not_the_pipelines_class(tmp_path, tiny_mistral):
    # The handbook calls its class DPOConfig: messages must not say "DPO" for NCA
    DPOConfig = type("DPOConfig", (HandbookNCAConfig,), {})  # noqa: N806 - the class name a pipeline uses
    with pytest.raises(ValueError) as info:
        parse(dataclass(DPOConfig), recipe(tmp_path, tiny_mistral, "ipo", loss_type="ipo"))
    message = str(info.value)
    assert "cannot be used to train NCA (loss 'nca')" in message and "DPO loss" not in message.split("use")[0]
    with pytest.raises(ValueError, match=r"train InfoNCA \(loss 'infonca'\)"):
        InfoNCATrainer(model=str(tiny_mistral), args=parse(HandbookNCAConfig, recipe(tmp_path, tiny_mistral, "x"))[1])


@pytest.mark.slow
def test_resuming_from_a_dpo_trainer_checkpoint_is_told_apart(tiny_mistral, hh, tmp_path):
    """The handbook resumes from get_last_checkpoint(output_dir): a complete checkpoint written by trl.DPOTrainer in
    that folder is named as another trainer's (not as half-written), with what to do; a half-written one is not."""
    data = short_prompts(hh, 2)
    _, args, model_args = parse(HandbookDPOConfig, recipe(tmp_path, tiny_mistral, "run", max_steps=1,
                                                          save_strategy="steps", save_steps=1))
    DPOTrainer(model=model_args.model_name_or_path, args=args, train_dataset=data).train()
    checkpoint = get_last_checkpoint(args.output_dir)
    assert checkpoint.endswith("checkpoint-1")

    ours = NCATrainer(model=model_args.model_name_or_path, args=args, train_dataset=data)
    for resume in (checkpoint, True):
        with pytest.raises(ValueError) as info:
            ours.train(resume_from_checkpoint=resume)
        message = str(info.value)
        assert "written by another trainer, such as trl.DPOTrainer" in message, message
        assert "stopped while writing" not in message and "use another output_dir" in message
        assert COMPLETE_MARKER in message

    # A checkpoint nca-trl stopped writing (its trainer_state.json, written last, is missing) is still called so
    (tmp_path / "run" / "checkpoint-1" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="stopped while writing it"):
        ours.train(resume_from_checkpoint=checkpoint)
