"""Config errors are found before any model is loaded: batch sizes < 1 and fp16 / bf16 where this
device cannot run them when the config is built (`nca_trl.config`), every row dropped by `max_length` by the preflight
of `nca-trl train` (`nca_trl.train.preflight`, tokenizer only). And `dataloader_pin_memory` is off where it has no effect."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from nca_trl import InfoNCAConfig, NCAConfig
from nca_trl.train.arguments import parse_train_args
from nca_trl.cli import main
from nca_trl.data.tokenize import prepare_rated_dataset

REPO = Path(__file__).resolve().parents[1]
VICUNA = REPO / "data" / "vicuna_rated.jsonl"
TINY = REPO / "recipes" / "tiny" / "nca.yaml"
ACCELERATOR = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
cpu_only = pytest.mark.skipif(ACCELERATOR, reason="checks what a machine without an accelerator refuses")


def never_loaded(tmp_path):
    """A model folder that is never loaded (empty): the refusals below come before any model, the path check passes."""
    (tmp_path / "never-loaded").mkdir(exist_ok=True)
    return tmp_path / "never-loaded"


def train_argv(tmp_path, model, *extra):
    return [
        "train", "--config", str(TINY), "--model_name_or_path", str(model), "--dataset_name", str(VICUNA),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--max_train_samples", "6", "--max_eval_samples",
        "2", "--eval_strategy", "no", *extra,
    ]


# ---------------------------------------------------------------------------------------------------------- batch sizes
@pytest.mark.parametrize(
    "field", ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
              "precompute_ref_batch_size"],
)
@pytest.mark.parametrize("config_class", [NCAConfig, InfoNCAConfig])
def test_batch_sizes_below_one_are_refused_naming_the_field(tmp_path, field, config_class):
    """Before: accepted; training failed after the model loaded (`batch_size should be a positive integer value, but
    got batch_size=0` from torch's sampler, or `ZeroDivisionError` for gradient_accumulation_steps=0)."""
    for value in (0, -2):
        with pytest.raises(ValueError, match=rf"`{field}` \(.*\) must be an integer >= 1, got {value}"):
            config_class(output_dir=str(tmp_path), bf16=False, use_cpu=True, **{field: value})
    config_class(output_dir=str(tmp_path), bf16=False, use_cpu=True, **{field: 1})


def refused(argv, capsys) -> str:
    """The one-line `nca-trl COMMAND: error: ...` of a setting the CLI refuses (exit 2), without its prefix."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    prefix = f"nca-trl {argv[0]}: error: "
    logged, _, line = err.rpartition("\n" + prefix)  # after the run's `[nca-trl] ...` log lines, if any
    line = line if logged else err.removeprefix(prefix)
    assert (logged or err.startswith(prefix)) and "Traceback" not in err, err
    assert all(entry.startswith("[nca-trl] ") for entry in logged.splitlines()), err
    return line


def test_cli_batch_size_zero_fails_before_the_model(tmp_path, capsys):
    """The model folder is empty (never loaded): the config error comes first."""
    err = refused(train_argv(tmp_path, never_loaded(tmp_path), "--per_device_train_batch_size", "0"), capsys)
    assert re.search("`per_device_train_batch_size` .* got 0", err), err


# ---------------------------------------------------------------------------------------------------------- packages
@pytest.mark.parametrize("command", ["train", "iterate"])
def test_lora_without_peft_installed_fails_before_anything_runs(command, tmp_path, capsys, monkeypatch):
    """`pip install nca-trl` brings no peft. A LoRA recipe then raised TRL's ValueError, with a traceback, once the
    data was loaded and tokenized; `nca-trl iterate` had generated and scored a round and left its folders behind."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    out = tmp_path / "out"
    if command == "train":
        argv = train_argv(tmp_path, never_loaded(tmp_path), "--use_peft", "true")
    else:
        argv = ["iterate", "--config", str(REPO / "recipes/tiny/iterate_nca_lora.yaml"), "--model_name_or_path",
                str(never_loaded(tmp_path)), "--dataset_name", str(REPO / "data/sort_prompts.jsonl"),
                "--output_dir", str(out)]
    err = refused(argv, capsys)
    # iterate's training settings live under its recipe's `training:` (the message named no place before)
    at, there = ("", "") if command == "train" else (" in the `training:` mapping of the iterate run", " there")
    assert err == (f'`use_peft: true`{at} needs the `peft` package, which is not installed: pip install '
                   f'"nca-trl[peft]", or set `use_peft: false`{there}.\n'), err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------- precision
@cpu_only
def test_fp16_on_the_cpu_is_refused(tmp_path, capsys):
    """Before: accepted, and accelerate switched fp16 off on the CPU without a word (no autocast, no grad scaler):
    the run trained in float32."""
    for use_cpu in (False, True):
        with pytest.raises(ValueError, match=r"`fp16=True` cannot run here: training runs on the CPU"):
            NCAConfig(output_dir=str(tmp_path), fp16=True, bf16=False, use_cpu=use_cpu)
    err = refused(train_argv(tmp_path, never_loaded(tmp_path), "--fp16", "true"), capsys)
    assert re.search(r"`fp16: true` in the recipe \(or `--fp16 true`\) cannot run here", err), err
    # --dry_run validates a GPU recipe on any machine: the hardware checks are relaxed
    assert main(train_argv(tmp_path, never_loaded(tmp_path), "--fp16", "true", "--dry_run")) == 0
    assert parse_train_args(train_argv(tmp_path, "m", "--bf16", "true")[1:], dry_run=True).training.bf16
    NCAConfig(output_dir=str(tmp_path), fp16=False, bf16=False)  # the relaxation does not outlive the dry run
    with pytest.raises(ValueError, match="`fp16=True` cannot run here"):
        NCAConfig(output_dir=str(tmp_path), fp16=True, bf16=False)


@cpu_only
def test_bf16_is_automatic_and_an_explicit_bf16_without_a_bf16_gpu_says_what_to_do(tmp_path, capsys):
    """Before: our configs inherited TRL's default (bf16 unless fp16), so `NCAConfig(output_dir=...)`, the README's
    Python example, was refused on a CPU with a hint in recipe syntax. Now an unset `bf16` is automatic (off here), an
    explicit `bf16=True` is still refused, in the words of whoever set it: Python arguments from Python, recipe keys
    and flags from the command line. bf16 on the CPU with `use_cpu=True` runs (CPU autocast)."""
    for config_class in (NCAConfig, InfoNCAConfig):
        args = config_class(output_dir=str(tmp_path))
        assert args.bf16 is False and args.bf16_is_automatic
    with pytest.raises(ValueError, match=r"^`bf16=True` needs a GPU with bfloat16 support.*Leave `bf16` unset.*"
                       r"`bf16=False`.*`use_cpu=True`.*--dry_run") as python:
        NCAConfig(output_dir=str(tmp_path), bf16=True)
    assert "bf16: " not in str(python.value)
    err = refused(train_argv(tmp_path, never_loaded(tmp_path), "--bf16", "true"), capsys)
    assert re.match(r"^`bf16: true` in the recipe \(or `--bf16 true`\) needs a GPU with "
                    r"bfloat16.*`bf16: false` in the recipe \(or `--bf16 false`\)", err), err
    assert "bf16=" not in err
    # The other switch checks so too (they named Python arguments on the command line)
    err = refused(train_argv(tmp_path, never_loaded(tmp_path), "--padding_free", "true", "--shared_prompt", "false"),
                  capsys)
    assert "`padding_free: true` in the recipe (or `--padding_free true`)" in err and "padding_free=" not in err
    err = refused(train_argv(tmp_path, never_loaded(tmp_path), "--activation_offloading", "true"), capsys)
    assert err.startswith("`activation_offloading: true` in the recipe (or `--activation_offloading true`)"), err
    assert NCAConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True).bf16
    # --dry_run of a GPU recipe says what bf16 resolves to on this machine, the real one
    assert parse_train_args(train_argv(tmp_path, "m")[1:], dry_run=True).training.bf16 is False


# ---------------------------------------------------------------------------------------------------------- max_length
def rows(n):
    return [json.loads(line) for line in VICUNA.read_text().splitlines()[:n]]


def check_max_length(dataset, tokenizer, args, name="train"):
    """The trainers' dataset preparation, which refuses a dataset whose every prompt fills max_length."""
    return prepare_rated_dataset(dataset, tokenizer, args, name, getattr(args, "max_completions", None))


def test_check_max_length_names_the_shortest_prompt(tokenizer):
    from datasets import Dataset

    from nca_trl.data.tokenize import tokenize_rated_example

    data = Dataset.from_list(rows(6))
    lengths = [len(tokenize_rated_example(r, tokenizer, tokenizer.eos_token)["prompt_ids"]) for r in data]
    shortest = min(lengths)
    args = NCAConfig(output_dir="unused", bf16=False, use_cpu=True, max_length=shortest)
    with pytest.raises(ValueError) as info:
        check_max_length(data, tokenizer, args, "train")
    message = str(info.value)
    assert "every one of its 6 rows would be dropped" in message and f"max_length={shortest} tokens" in message
    assert f"shortest {shortest} (row {lengths.index(shortest)})" in message and f"longest {max(lengths)}" in message
    assert f"raise `max_length` above {shortest}" in message
    # One token more keeps the shortest row: no error; keep_end never drops a row; no max_length, nothing to check
    check_max_length(data, tokenizer, NCAConfig(output_dir="u", bf16=False, use_cpu=True, max_length=shortest + 1))
    check_max_length(data, tokenizer, NCAConfig(
        output_dir="u", bf16=False, use_cpu=True, max_length=shortest, truncation_mode="keep_end"))
    check_max_length(data, tokenizer, NCAConfig(output_dir="u", bf16=False, use_cpu=True, max_length=None))
    # Preference rows are converted as the trainer does; a row the trainer would refuse is refused by name
    pairs = Dataset.from_list([{"prompt": "Hello there, how are you?", "chosen": "Fine", "rejected": "Bad"}])
    with pytest.raises(ValueError, match="every one of its 1 rows"):
        check_max_length(pairs, tokenizer, NCAConfig(output_dir="u", bf16=False, use_cpu=True, max_length=3))
    with pytest.raises(ValueError, match="row 0"):
        check_max_length(Dataset.from_list([{"prompt": "q", "completions": ["a", "b"], "rewards": [1.0, float("nan")]}]),
                         tokenizer, NCAConfig(output_dir="u", bf16=False, use_cpu=True, max_length=3))


def test_cli_every_row_dropped_fails_before_the_model(tmp_path, tokenizer, capsys):
    """Before: the rows were dropped with a warning, then training failed after the model loaded with torch's
    `num_samples should be a positive integer value, but got num_samples=0`. The "model" here is a tokenizer alone
    (no config, no weights): loading a model from it would fail, so the error shows nothing but the tokenizer was
    loaded. On the command line it is a refused setting (`max_length`): one line, exit 2."""
    folder = tmp_path / "tokenizer-only"
    tokenizer.save_pretrained(folder)
    err = refused(train_argv(tmp_path, folder, "--max_length", "8"), capsys)
    assert re.match(r"train dataset: every one of its 6 rows would be dropped.*shortest \d+", err), err


def test_empty_dataset_fails_before_the_model(tmp_path):
    """Before: a dataset left empty by conversion reached the trainer, which failed after loading the model with a bare
    `StopIteration` (`next(iter(dataset))` in `prepare_rated_dataset`). The check runs before the tokenizer loads (the
    model path does not exist)."""
    from types import SimpleNamespace

    from datasets import Dataset

    from nca_trl.train.preflight import check_before_training

    args = SimpleNamespace(
        training=NCAConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, max_length=64),
        model=SimpleNamespace(model_name_or_path=str(tmp_path / "no-such-model")),
    )
    empty = Dataset.from_dict({"prompt": [], "completions": [], "rewards": []})
    with pytest.raises(ValueError, match="The train dataset has no row left after loading and conversion"):
        check_before_training(args, empty, None)
    with pytest.raises(ValueError, match=r"The eval \('heldout'\) dataset has no row"):
        check_before_training(args, Dataset.from_list(rows(1)), {"train_prompts": Dataset.from_list(rows(1)), "heldout": empty})


# ---------------------------------------------------------------------------------------------------------- pin memory
@cpu_only
def test_pin_memory_off_without_an_accelerator_and_no_warning(tiny_mistral, tmp_path):
    """Before: True by default without `use_cpu`, and torch warned on every DataLoader ("'pin_memory' argument is set
    as true but no accelerator is found")."""
    from datasets import Dataset

    from nca_trl import NCATrainer

    args = NCAConfig(
        output_dir=str(tmp_path / "out"), bf16=False, max_steps=1, per_device_train_batch_size=2, max_length=64,
        report_to="none", save_strategy="no", activation_checkpointing=False, dataloader_num_workers=0,
    )
    assert args.dataloader_pin_memory is False
    assert NCAConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True).dataloader_pin_memory is False
    trainer = NCATrainer(model=tiny_mistral, args=args, train_dataset=Dataset.from_list(rows(2)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "pin_memory" in str(w.message)]


# ---------------------------------------------------------------------------------------------------------- ties
@pytest.mark.slow  # over a few seconds on 2 cores
def test_ties_keep_or_drop_tied_prompts_counted(tiny_mistral, tmp_path):
    """`ties`: prompts whose rewards all tie are trained (uniform targets, `keep`, the default) or left out and
    counted (`drop`), in the log and in `run_info.json`; a dataset of ties only, dropped, is an error."""
    from nca_trl.train import train

    data = rows(6)
    data[1]["rewards"] = [3.0] * len(data[1]["rewards"])
    data[4]["rewards"] = [2.5] * len(data[4]["rewards"])
    path = tmp_path / "ties.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    argv = ["--model_name_or_path", str(tiny_mistral), "--dataset_name", str(path), "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--max_length", "64", "--use_cpu", "true", "--report_to", "none",
            "--save_strategy", "no", "--activation_checkpointing", "false"]
    tied_before = sum(len(set(r["rewards"])) == 1 for r in data)
    kept = train([*argv, "--output_dir", str(tmp_path / "keep")])
    assert kept["dropped"]["train"] == {"ties_dropped": 0, "too_long_dropped": 0,
                                        "cut_completions": kept["dropped"]["train"]["cut_completions"]}
    dropped = train([*argv, "--output_dir", str(tmp_path / "drop"), "--ties", "drop"])
    assert dropped["dropped"]["train"]["ties_dropped"] == tied_before >= 2
    assert json.loads((tmp_path / "drop" / "run_info.json").read_text())["dropped"]["train"]["ties_dropped"] == \
        tied_before
    with pytest.raises(ValueError, match="`ties='maybe'` is not a choice"):
        NCAConfig(output_dir=str(tmp_path / "x"), ties="maybe")
    path.write_text("".join(json.dumps({**r, "rewards": [1.0] * len(r["rewards"])}) + "\n" for r in data))
    with pytest.raises(ValueError, match="every one of its 6 prompts tie"):
        train([*argv, "--output_dir", str(tmp_path / "all"), "--ties", "drop"])
    from nca_trl.runtime.errors import DataError

    with pytest.raises(DataError):  # one line on the command line, exit 2 (was a traceback, exit 1)
        train([*argv, "--output_dir", str(tmp_path / "all"), "--ties", "drop"])


def test_one_tie_rule_for_validation_ties_drop_and_the_dpo_pairs():
    """Before: validation counted exactly equal rewards, `ties: drop` dropped rewards equal within float rounding, and
    iterate's DPO baseline paired any rewards not exactly equal: 0.3 and 0.1 + 0.2 were a tie for one and a preference
    for the others. Now all three use `nca_trl.data.rewards.rewards_tie`."""
    from datasets import Dataset

    from nca_trl.data import validate_dataset
    from nca_trl.data.rewards import rewards_tie
    from nca_trl.iterate.stages import best_worst_pairs

    rows = [{"prompt": "a", "completions": ["x", "y"], "rewards": [0.3, 0.1 + 0.2]},
            {"prompt": "b", "completions": ["x", "y"], "rewards": [1.0, 0.0]}]
    assert rewards_tie(rows[0]["rewards"]) and not rewards_tie(rows[1]["rewards"])
    report = validate_dataset(Dataset.from_list(rows))
    assert report.num_all_equal_rewards == 1 and report.all_equal_rows == [0]
    pairs, ties = best_worst_pairs(rows)
    assert ties == 1 and [p["prompt"] for p in pairs] == ["b"]
