"""The conformance table of docs/pipelines.md ("DPOTrainer's features after the one-line swap"), row by row.

Every "same as DPOTrainer" row runs `trl.DPOTrainer` and each of our trainers on a plain `trl.DPOConfig`, on the same
chosen/rejected pairs, and checks the same outcome (the same step losses where the loss is the same: `NCATrainer` is
TRL's `nca_pair`, `InfoNCATrainer` its `sigmoid`); every "refused" row checks the one-line message. The table itself
is read from the page, so a row without a test (or a test without a row) fails here.
"""

import math
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from nca_trl import InfoNCATrainer, NCATrainer

from test_trainer import make_args, record_losses, short_prompts

PIPELINES = Path(__file__).resolve().parents[1] / "docs" / "pipelines.md"
OURS = {NCATrainer: "nca_pair", InfoNCATrainer: "sigmoid"}  # our trainer -> DPOTrainer's loss_type on pairs
ROWS: dict[str, str] = {}  # row name -> "same" | "refused" | "differs", filled by the tests' decorators


def row(name: str, kind: str):
    def mark(test):
        ROWS[name] = kind
        return test
    return mark


def table() -> dict[str, str]:
    """docs/pipelines.md's conformance table: feature -> its first word ("same", "refused" or "differs")."""
    text = PIPELINES.read_text()
    section = text[text.index("## DPOTrainer's features after the swap"):]
    rows = re.findall(r"^\| ([^|]+?) \| (same|refused|differs)\b[^|]*\|$", section, re.M)
    return {name.strip(): kind for name, kind in rows}


@pytest.fixture(scope="module")
def pairs(hh):
    return short_prompts(hh, 4)


def same_losses(tiny_mistral, pairs, tmp_path, trainer_kwargs=None, trainers=(NCATrainer,), **config):
    """Our trainers (`trainers`) and DPOTrainer with the matching pairwise loss_type: the same step losses. The rows
    take NCATrainer or InfoNCATrainer in turn (both share the machinery; "loss on pairs" runs both)."""
    for ours, loss_type in ((t, OURS[t]) for t in trainers):
        runs = {}
        for cls, lt in ((DPOTrainer, loss_type), (ours, "sigmoid")):
            kwargs = {name: value() if callable(value) else value for name, value in (trainer_kwargs or {}).items()}
            args = make_args(DPOConfig, tmp_path / f"{cls.__name__}-{lt}", max_steps=2, max_length=64, loss_type=lt,
                             beta=0.1, learning_rate=1e-3, **config)
            trainer = cls(model=tiny_mistral, args=args, train_dataset=pairs, **kwargs)
            losses = record_losses(trainer)
            trainer.train()
            runs[cls] = (trainer, losses)
        (dpo, dpo_losses), (trainer, our_losses) = runs[DPOTrainer], runs[ours]
        assert len(our_losses) == len(dpo_losses) == 2
        assert our_losses == pytest.approx(dpo_losses, abs=1e-5), ours.__name__
        yield ours, dpo, trainer


def refused(tiny_mistral, pairs, tmp_path, pattern, trainers=(NCATrainer, InfoNCATrainer), **config):
    for cls in trainers:
        with pytest.raises((ValueError, NotImplementedError, TypeError)) as error:
            cls(model=tiny_mistral, args=make_args(DPOConfig, tmp_path, **config), train_dataset=pairs)
        message = str(error.value)
        assert re.search(pattern, message), (cls.__name__, message)
        assert "\n" not in message, message  # one line


def test_every_row_of_the_table_has_its_test():
    assert table() == ROWS


# ------------------------------------------------------------------------------------------------ same as DPOTrainer
@pytest.mark.slow
@row("loss on pairs", "same")
def test_loss_on_pairs(tiny_mistral, pairs, tmp_path):
    for _ in same_losses(tiny_mistral, pairs, tmp_path, trainers=(NCATrainer, InfoNCATrainer)):
        pass


@pytest.mark.slow
@row("explicit reference model", "same")
def test_explicit_reference(tiny_mistral, tiny_mistral_ref, pairs, tmp_path):
    ref = {"ref_model": lambda: AutoModelForCausalLM.from_pretrained(tiny_mistral_ref)}
    for _ in same_losses(tiny_mistral, pairs, tmp_path, trainer_kwargs=ref, trainers=(InfoNCATrainer,)):
        pass


@pytest.mark.slow
@row("implicit reference model (a copy of the policy)", "same")
def test_implicit_reference(tiny_mistral, pairs, tmp_path):
    for _, dpo, ours in same_losses(tiny_mistral, pairs, tmp_path):
        assert ours.ref_model is not ours.model and dpo.ref_model is not dpo.model
        for a, b in zip(ours.ref_model.parameters(), dpo.ref_model.parameters()):  # both the untrained policy
            assert torch.equal(a, b)


@pytest.mark.slow
@row("PEFT reference (the adapter disabled)", "same")
def test_peft_reference(tiny_mistral, pairs, tmp_path):
    from peft import LoraConfig

    lora = {"peft_config": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                              task_type="CAUSAL_LM")}
    for _, dpo, ours in same_losses(tiny_mistral, pairs, tmp_path, trainer_kwargs=lora, trainers=(InfoNCATrainer,)):
        assert ours.ref_model is None and dpo.ref_model is None


@pytest.mark.slow
@row("synced reference model (`sync_ref_model`)", "same")
def test_synced_reference(tiny_mistral, pairs, tmp_path):
    """With mixup 1.0 every 1 step, the reference becomes the policy: in DPOTrainer and in ours alike."""
    sync = dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=1.0)
    for _, dpo, ours in same_losses(tiny_mistral, pairs, tmp_path, **sync):
        for trainer in (dpo, ours):
            for p, r in zip(trainer.model.parameters(), trainer.ref_model.parameters()):
                assert torch.equal(p.detach(), r.detach())


@pytest.mark.slow
@row("`precompute_ref_log_probs`", "same")
def test_precompute(tiny_mistral, pairs, tmp_path):
    for _, dpo, ours in same_losses(tiny_mistral, pairs, tmp_path, trainers=(InfoNCATrainer,),
                                    precompute_ref_log_probs=True):
        assert "ref_logps" in ours.train_dataset.column_names


@pytest.mark.slow
@row("evaluation (`eval_dataset`, `evaluate()`)", "same")
def test_evaluation(tiny_mistral, pairs, hh, tmp_path):
    held_out = short_prompts(hh, 6).select(range(4, 6))
    for ours, dpo, trainer in same_losses(tiny_mistral, pairs, tmp_path):
        a, b = dpo.evaluate(held_out), trainer.evaluate(held_out)
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5), ours.__name__
        for key in ("eval_rewards/chosen", "eval_rewards/margins", "eval_logps/chosen", "eval_rewards/accuracies"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key


@pytest.mark.slow
@row("streaming data (`IterableDataset`)", "same")
def test_streaming(tiny_mistral, pairs, tmp_path):
    stream = pairs.to_iterable_dataset()
    outcomes = {}
    for cls, loss_type in ((DPOTrainer, "nca_pair"), (NCATrainer, "sigmoid")):
        args = make_args(DPOConfig, tmp_path / cls.__name__, max_steps=2, max_length=64, loss_type=loss_type,
                         beta=0.1)
        trainer = cls(model=tiny_mistral, args=args, train_dataset=stream, eval_dataset=stream)
        losses = record_losses(trainer)
        trainer.train()
        outcomes[cls] = (losses[:2], trainer.evaluate()["eval_loss"])
    assert outcomes[NCATrainer][0] == pytest.approx(outcomes[DPOTrainer][0], abs=1e-5)
    assert outcomes[NCATrainer][1] == pytest.approx(outcomes[DPOTrainer][1], abs=1e-5)


@pytest.mark.slow
@row("`compute_metrics`", "same")
def test_compute_metrics(tiny_mistral, pairs, tmp_path):
    for cls in (DPOTrainer, NCATrainer, InfoNCATrainer):
        shapes = []

        def compute_metrics(prediction, shapes=shapes):
            shapes.append(prediction.predictions.shape)
            return {"seen": float(len(shapes))}

        args = make_args(DPOConfig, tmp_path / cls.__name__, max_steps=1, max_length=64)
        trainer = cls(model=tiny_mistral, args=args, train_dataset=pairs, eval_dataset=pairs,
                      compute_metrics=compute_metrics)
        trainer.train()
        assert trainer.evaluate()["eval_seen"] >= 1 and shapes[0][-1] == trainer.model.config.vocab_size, cls


@pytest.mark.slow
@row("tool calls (`tool_calls`, `tools`)", "same")
def test_tool_calls(tiny_mistral, tmp_path):
    from test_tool_calls import TOOL_TEMPLATE, pair_rows
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_mistral)
    tokenizer.chat_template = TOOL_TEMPLATE
    losses = {}
    for cls, loss_type in ((DPOTrainer, "nca_pair"), (NCATrainer, "sigmoid")):
        args = make_args(DPOConfig, tmp_path / cls.__name__, max_steps=1, max_length=256, loss_type=loss_type)
        trainer = cls(model=tiny_mistral, args=args, train_dataset=Dataset.from_list(pair_rows()),
                      processing_class=tokenizer)
        losses[cls] = record_losses(trainer)
        trainer.train()
    assert losses[NCATrainer] == pytest.approx(losses[DPOTrainer], abs=1e-5)


@pytest.mark.slow
@row("`padding_free`", "same")
def test_padding_free(tiny_mistral, pairs, tmp_path):
    """DPOTrainer falls back to padding (its padding-free path is disabled in TRL); ours trains padding-free, with the
    same losses."""
    for _, dpo, ours in same_losses(tiny_mistral, pairs, tmp_path, padding_free=True):
        assert ours.data_collator.shared_prompt and ours.padding_free


@pytest.mark.slow
@row("`torch_compile`", "same")
def test_torch_compile(tiny_mistral, pairs, tmp_path):
    """`model or ...` on a compiled model (`OptimizedModule`, which has no `len`) raised a TypeError at construction
    (the layout's check of the attention modules), then at the first step (the reference forward). The compiled model
    now trains with DPOTrainer's losses."""
    losses = {}
    for cls, loss_type, compiled in ((DPOTrainer, "nca_pair", False), (NCATrainer, "sigmoid", True)):
        args = make_args(DPOConfig, tmp_path / cls.__name__, max_steps=1, max_length=64, loss_type=loss_type,
                         beta=0.1, learning_rate=1e-3, torch_compile=compiled, torch_compile_backend="eager")
        trainer = cls(model=tiny_mistral, args=args, train_dataset=pairs)
        losses[cls] = record_losses(trainer)
        trainer.train()
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule" and trainer.data_collator.shared_prompt
    assert losses[NCATrainer] == pytest.approx(losses[DPOTrainer], abs=1e-5) and len(losses[DPOTrainer]) == 1


@row("`use_logits_to_keep`", "same")
def test_use_logits_to_keep():
    """Not a DPOConfig field in TRL 1.16: the same TypeError for every trainer, which all take a DPOConfig."""
    with pytest.raises(TypeError, match="use_logits_to_keep"):
        DPOConfig(output_dir="unused", use_logits_to_keep=True)


# ------------------------------------------------------------------------------------------------ refused
@row("vision models (`image`, `images` columns)", "refused")
def test_vision(tiny_mistral, pairs, tmp_path):
    images = pairs.add_column("images", [[]] * len(pairs))
    refused(tiny_mistral, images, tmp_path, r"^The dataset appears to be vision-related \(contains 'image' or 'images' "
            r"keys\).*text-only")


@row("a pairwise `data_collator` (TRL's `DataCollatorForPreference`)", "refused")
def test_pairwise_collator(tiny_mistral, pairs, tmp_path):
    """It raised `KeyError: 'chosen_ids'` at the first step; refused at construction. Our own collator, given
    explicitly, trains."""
    from transformers import AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from nca_trl.data.collator import DataCollatorForRatedCompletions

    pad = AutoTokenizer.from_pretrained(tiny_mistral).eos_token_id
    with pytest.raises(ValueError, match=r"^data_collator=DataCollatorForPreference does not build the batches .*"
                                         r"raised KeyError: 'chosen_ids'.* Leave `data_collator` unset"):
        NCATrainer(model=tiny_mistral, args=make_args(DPOConfig, tmp_path), train_dataset=pairs,
                   data_collator=DataCollatorForPreference(pad_token_id=pad))
    ours = DataCollatorForRatedCompletions(pad_token_id=pad, max_length=64)
    trainer = NCATrainer(model=tiny_mistral, args=make_args(DPOConfig, tmp_path, max_steps=1), train_dataset=pairs,
                         data_collator=ours)
    assert trainer.data_collator is ours and math.isfinite(trainer.train().training_loss)


@row("`use_liger_kernel`", "refused")
def test_liger(tiny_mistral, pairs, tmp_path):
    refused(tiny_mistral, pairs, tmp_path, r"`use_liger_kernel=True` (needs the `liger-kernel` package|cannot run)",
            use_liger_kernel=True)


@row("other `loss_type`s (`ipo`, `hinge`, `robust`, ...)", "refused")
def test_other_loss_types(tiny_mistral, pairs, tmp_path):
    for loss_type in ("hinge", "ipo", "exo_pair", "robust", "bco_pair", "sppo_hard", "aot", "apo_zero", "sft"):
        refused(tiny_mistral, pairs, tmp_path, r"cannot be used to train .* always trains the", loss_type=loss_type)
    refused(tiny_mistral, pairs, tmp_path, "cannot be used to train InfoNCA", trainers=(InfoNCATrainer,),
            loss_type="nca_pair")


@row("WPO (`use_weighting`)", "refused")
def test_wpo(tiny_mistral, pairs, tmp_path):
    refused(tiny_mistral, pairs, tmp_path, r"`use_weighting=True`.*WPO", use_weighting=True)


@row("LD-DPO (`ld_alpha`)", "refused")
def test_ld(tiny_mistral, pairs, tmp_path):
    refused(tiny_mistral, pairs, tmp_path, r"`ld_alpha=0.5`.*LD-DPO", ld_alpha=0.5)


@row("f-divergence (`f_divergence_type`)", "refused")
def test_f_divergence(tiny_mistral, pairs, tmp_path):
    refused(tiny_mistral, pairs, tmp_path, r"`f_divergence_type='js_divergence'`.*f-DPO",
            f_divergence_type="js_divergence")


@row("model tags (`dpo`)", "differs")
def test_model_tags(tiny_mistral, pairs, tmp_path):
    """Ours tag the model with the loss trained, never `dpo`."""
    for cls in (NCATrainer, InfoNCATrainer):
        trainer = cls(model=tiny_mistral, args=make_args(DPOConfig, tmp_path), train_dataset=pairs)
        tags = set(trainer.model.model_tags)
        assert "dpo" not in tags and {"trl", "nca-trl", trainer.loss_name} <= tags, tags
