"""`nca-trl` CLI: every shipped recipe parses with the real parser, the big ones fit their hardware by the memory plan,
unknown keys fail by name, the data options load what they say, and one end-to-end single-process run."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_script

from nca_trl.cli import main
from nca_trl.runtime.errors import ROW_INDEX
from nca_trl.data.loading import load_datasets
from nca_trl.train.arguments import parse_train_args

REPO = Path(__file__).resolve().parents[1]
VICUNA = REPO / "data" / "vicuna_rated.jsonl"
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml")
                 if "accelerate_configs" not in p.parts and not p.name.startswith("iterate"))  # train recipes
# `nca-trl iterate` recipes (recipes/*/iterate_*.yaml) are checked in tests/test_iterate.py
BIG = [p for p in RECIPES if p.parent.name in ("mistral-7b", "mixtral-8x7b")]
TINY = [p for p in RECIPES if p.parent.name == "tiny"]


def rel(p: Path) -> str:
    return str(p.relative_to(REPO))


def test_recipe_inventory():
    names = {rel(p) for p in RECIPES}
    for expected in (
        "recipes/mistral-7b/nca_ultrafeedback.yaml",
        "recipes/mistral-7b/infonca_ultrafeedback.yaml",
        "recipes/mistral-7b/nca_pairs.yaml",
        "recipes/mistral-7b/nca_qlora.yaml",
        "recipes/mixtral-8x7b/nca.yaml",
        "recipes/mixtral-8x7b/infonca.yaml",
        "recipes/mixtral-8x7b/nca_offload.yaml",
        "recipes/mixtral-8x7b/qlora.yaml",
        "recipes/tiny/nca.yaml",
        "recipes/tiny/infonca.yaml",
        "recipes/tiny/nca_mixtral.yaml",
    ):
        assert expected in names
    fsdp2 = yaml.safe_load((REPO / "recipes" / "accelerate_configs" / "fsdp2.yaml").read_text())
    assert fsdp2["distributed_type"] == "FSDP" and fsdp2["fsdp_config"]["fsdp_version"] == 2
    for name in ("ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"):
        accel = yaml.safe_load((REPO / "recipes" / "accelerate_configs" / f"{name}.yaml").read_text())
        assert accel["num_processes"] == 8 and accel["num_machines"] == 1
        if name.startswith("deepspeed"):
            ds = accel["deepspeed_config"]
            assert accel["distributed_type"] == "DEEPSPEED" and ds["deepspeed_multinode_launcher"] == "standard"
            if "zero3" in name:
                assert ds["zero_stage"] == 3 and ds["zero3_init_flag"] is True and ds["zero3_save_16bit_model"] is True
        else:
            assert accel["distributed_type"] == "MULTI_GPU"
    assert (REPO / "recipes" / "slurm" / "multinode.sbatch").exists()


@pytest.mark.parametrize("recipe", BIG, ids=rel)
def test_big_recipes_parse_with_paper_hyperparameters(recipe):
    from nca_trl import InfoNCAConfig, NCAConfig

    args = parse_train_args(["--config", str(recipe)], dry_run=True)
    t, s, m = args.training, args.script, args.model
    assert type(t) is {"nca": NCAConfig, "infonca": InfoNCAConfig}[s.loss]
    assert (t.beta, t.learning_rate, t.lr_scheduler_type.value) == (0.01, 5e-6, "cosine")
    assert t.warmup_steps == 0.1 and t.num_train_epochs == 1 and t.max_length == 1024
    assert t.bf16 and t.activation_checkpointing and m.dtype == "bfloat16"
    assert t.model_init_kwargs["dtype"] == "bfloat16"
    hw = load_script("plan_memory").parse_hardware(s.hardware)
    gpus = hw["nodes"] * hw["gpus_per_node"]
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps * gpus == 32, "global batch of 32 prompts"
    assert (REPO / s.model_config_file).exists()
    if s.accelerate_config is not None:
        assert (REPO / s.accelerate_config).exists()
        if hw["nodes"] > 1:
            assert "zero3" in s.accelerate_config
    if s.dataset_name == "openbmb/UltraFeedback":
        assert s.dataset_format == "ultrafeedback" and s.dataset_format_kwargs["score_field"] == "overall_score"
    if "mixtral" in str(recipe):
        assert t.router_aux_loss_coef == 0.02
    if "qlora" in recipe.name:
        assert m.load_in_4bit and m.use_peft and s.accelerate_config is None and gpus == 1
        assert t.model_init_kwargs["device_map"] == {"": 0}


@pytest.mark.parametrize("recipe", TINY, ids=rel)
def test_tiny_recipes_parse_for_cpu(recipe):
    args = parse_train_args(["--config", str(recipe)], dry_run=False)  # no dry run: must be valid on this CPU machine
    t, s = args.training, args.script
    assert not t.bf16 and not t.activation_checkpointing
    assert (REPO / s.dataset_name).exists() and s.dataset_format == "rated"
    assert args.model.model_name_or_path.startswith("outputs/tiny-")


def test_dry_run_prints_the_plan_and_loads_nothing(capsys):
    assert main(["train", "--config", str(REPO / "recipes/mixtral-8x7b/nca.yaml"), "--dry_run"]) == 0
    assert "dry run" in capsys.readouterr().out
    # The global batch comes from the recipe's `hardware` launch metadata, which scripts/plan_memory.py parses
    assert load_script("plan_memory").main([str(REPO / "recipes/mixtral-8x7b/nca.yaml")]) == 0
    assert "x 16 processes = 32 prompts (global batch)" in capsys.readouterr().out


def test_unknown_recipe_key_fails_naming_it(tmp_path):
    recipe = yaml.safe_load((REPO / "recipes/tiny/nca.yaml").read_text())
    recipe["learning_rat"] = 1e-5
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"'learning_rat' \(did you mean 'learning_rate'"):
        parse_train_args(["--config", str(path)])
    with pytest.raises(ValueError, match="not_a_field"):
        parse_train_args(["--config", str(REPO / "recipes/tiny/nca.yaml"), "--not_a_field", "1"])


def test_loss_picks_the_config_and_command_line_overrides(tmp_path):
    from nca_trl import InfoNCAConfig, NCAConfig

    nca = parse_train_args(["--config", str(REPO / "recipes/tiny/nca.yaml")])
    assert type(nca.training) is NCAConfig and nca.training.loss_type == ["nca"]
    info = parse_train_args(
        ["--config", str(REPO / "recipes/tiny/nca.yaml"), "--loss", "infonca", "--alpha", "0", "--beta", "0.1"]
    )
    assert type(info.training) is InfoNCAConfig and info.training.alpha == 0 and info.training.beta == 0.1
    args = parse_train_args(
        ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", str(tmp_path), "--bf16", "false",
         "--attn_implementation", "sdpa", "--model_revision", "abc", "--dataset_format_kwargs", '{"score_field": "helpfulness"}']
    )
    assert args.training.model_init_kwargs == {"revision": "abc", "attn_implementation": "sdpa", "dtype": "float32"}
    assert args.script.dataset_format_kwargs == {"score_field": "helpfulness"}
    with pytest.raises(ValueError, match="loss"):
        parse_train_args(["--config", str(REPO / "recipes/tiny/nca.yaml"), "--loss", "dpo"])


def test_train_path_checks_each_rows_rewards_once(tiny_mistral, tmp_path, monkeypatch):
    """`nca-trl train` on rated data: every row's rewards are checked exactly once between the file and the loss (by
    the trainer's validation), and a bad row still fails before training, naming the row and the field."""
    from nca_trl.data import rewards, validation
    from nca_trl.train import train

    rows = [json.loads(line) for line in VICUNA.read_text().splitlines()[:6]]
    data = tmp_path / "rated.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    original = rewards.check_rewards

    def counted(values, row=None, *args, **kwargs):
        calls.append(row)
        return original(values, row, *args, **kwargs)

    monkeypatch.setattr(validation, "check_rewards", counted)
    argv = ["--model_name_or_path", str(tiny_mistral), "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "out"), "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "64",
            "--bf16", "false", "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no",
            "--report_train_prompts", "0", "--activation_checkpointing", "false"]
    train(argv)
    assert sorted(calls) == list(range(6))  # once per row

    rows[3]["rewards"][1] = float("nan")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(Exception, match=r"row 3, field 'rewards': reward at position 1 is NaN"):
        train(argv[:5] + [str(tmp_path / "out2")] + argv[6:])
    assert not (tmp_path / "out2" / "model.safetensors").exists()


def test_data_sources_splits_and_mixtures(tmp_path):
    """Local jsonl / parquet / folder / save_to_disk, a held-out fraction, sample caps, a mixture with fractions."""
    from datasets import load_dataset

    rows = load_dataset("json", data_files=str(VICUNA), split="train").select(range(20))
    rows.to_parquet(str(tmp_path / "v.parquet"))
    (tmp_path / "folder").mkdir()
    rows.to_json(str(tmp_path / "folder" / "train.jsonl"))
    rows.save_to_disk(str(tmp_path / "saved"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "good", "rejected": "bad"}) + "\n" for i in range(10)))

    def load(*extra):
        a = parse_train_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--bf16", "false", *extra])
        return load_datasets(a.script, a.mixture, a.training)

    for source in (str(tmp_path / "v.parquet"), str(tmp_path / "folder"), str(tmp_path / "saved")):
        train, evaluation = load("--dataset_name", source, "--eval_fraction", "0.25", "--max_train_samples", "10")
        # Rated rows reach the trainer as loaded: it validates every row once, then converts
        assert {"prompt", "completions", "rewards"} <= set(train.column_names) and len(train) == 10
        assert len(evaluation) == 5 and not set(evaluation["prompt"]) & set(train["prompt"])
        # Each row keeps its position in the data through the shuffled split: errors name the user's rows
        rows = {name: set(ds[ROW_INDEX]) for name, ds in (("train", train), ("eval", evaluation))}
        assert not rows["eval"] & rows["train"] and max(rows["eval"]) < 20
    train, evaluation = load("--dataset_name", str(pairs), "--dataset_format", "preference")
    assert evaluation is None and train.column_names == ["prompt", "chosen", "rejected", ROW_INDEX]
    assert train[ROW_INDEX] == list(range(10))
    with pytest.raises(ValueError, match="Split 'test' not found"):
        load("--dataset_name", str(pairs), "--dataset_test_split", "test")

    mixture = {
        "model_name_or_path": "m", "output_dir": str(tmp_path), "bf16": False, "max_eval_samples": 2,
        "datasets": [
            {"path": "json", "data_files": str(VICUNA), "fraction": 0.75, "columns": ["prompt", "completions", "rewards"]},
            {"path": "parquet", "data_files": str(tmp_path / "v.parquet"), "fraction": 0.25,
             "columns": ["prompt", "completions", "rewards"]},
        ],
        "test_split_size": 0.1,
    }
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump(mixture))
    a = parse_train_args(["--config", str(path)])
    train, evaluation = load_datasets(a.script, a.mixture, a.training)
    # The 20 rows of the second dataset cap the mixture at 80 rows (60 + 20); 10% is held out, capped to 2
    assert len(train) == 72 and len(evaluation) == 2
    # A local file as an entry's `path` (FileNotFoundError "Couldn't find any data file" of a file that exists), and
    # its files checked as `dataset_name`'s are (a raw UnicodeDecodeError, exit 1, for a file that is not UTF-8)
    for entry in mixture["datasets"]:
        entry["path"] = entry.pop("data_files")
    path.write_text(yaml.safe_dump(mixture))
    a = parse_train_args(["--config", str(path)])
    assert len(load_datasets(a.script, a.mixture, a.training)[0]) == 72
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "completions": ["a", "b"], "rewards": [1, 0]}\n')
    for bad in ({"path": str(latin)}, {"path": "json", "data_files": [str(latin)]}):
        mixture["datasets"][1] = bad
        path.write_text(yaml.safe_dump(mixture))
        a = parse_train_args(["--config", str(path)])
        with pytest.raises(ValueError, match=rf"{latin}.*line 1"):
            load_datasets(a.script, a.mixture, a.training)
    # Entries that datasets cannot concatenate (chat messages beside text) and `fraction` on some entries only were a
    # traceback through datasets / TRL (exit 1): a DataError naming the mixture (one line, exit 2)
    from nca_trl.runtime.errors import DataError

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "q"}], "rewards": [1, 0], "completions": [
        [{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]]}) + "\n")
    for entries in ([{"path": str(VICUNA)}, {"path": str(chat)}],
                    [{"path": str(VICUNA), "fraction": 0.5}, {"path": str(tmp_path / "v.parquet")}]):
        path.write_text(yaml.safe_dump({**mixture, "datasets": entries}))
        a = parse_train_args(["--config", str(path)])
        with pytest.raises(DataError, match=r"The `datasets:` mixture \(.*\) cannot be combined: .*Give every entry"):
            load_datasets(a.script, a.mixture, a.training)


def test_plan_memory_big_recipes_fit_their_hardware(capsys):
    plan_memory = load_script("plan_memory")
    plans = {rel(p): plan_memory.plan(str(p)) for p in BIG}
    for name, p in plans.items():
        assert p["fits"], f"{name} does not fit its stated hardware: {p}"
    mistral = plans["recipes/mistral-7b/nca_ultrafeedback.yaml"]
    assert abs(mistral["params"] - 7.24e9) < 0.01e9 and mistral["strategy"] == "ZeRO-3"
    mixtral = plans["recipes/mixtral-8x7b/nca.yaml"]
    assert abs(mixtral["params"] - 46.7e9) < 0.01e9 and mixtral["moe_leaf_classes"] == ["MixtralSparseMoeBlock"]
    assert plans["recipes/mixtral-8x7b/nca_offload.yaml"]["strategy"] == "ZeRO-3 + CPU offload"
    # The arithmetic: full Mixtral fine-tuning does not fit one 8 x 80 GB node without offload
    assert not plan_memory.plan(str(REPO / "recipes/mixtral-8x7b/nca.yaml"), nodes=1)["fits"]
    # ... and 4-bit Mixtral does not fit 80 GB: bitsandbytes leaves the fused 3D expert weights in bf16
    assert not plan_memory.plan(str(REPO / "recipes/mixtral-8x7b/qlora.yaml"), gpu_mem=80)["fits"]
    assert plan_memory.main([str(p) for p in BIG] + ["--markdown"]) == 0
    assert capsys.readouterr().out.count("| yes |") == len(BIG)


def test_plan_memory_plans_a_mistral_3_recipe(tmp_path):
    """Mistral Small 3.x is a `Mistral3ForConditionalGeneration` (`AutoModelForImageTextToText`): the plan raised
    "Unrecognized configuration class" building it with `AutoModelForCausalLM`, and its multimodal config holds the
    language model's sizes in `text_config`."""
    plan_memory = load_script("plan_memory")
    config = {"model_type": "mistral3", "spatial_merge_size": 2,
              "text_config": {"model_type": "mistral", "hidden_size": 5120, "intermediate_size": 32768,
                              "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
                              "head_dim": 128, "vocab_size": 131072},
              "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096,
                                "num_hidden_layers": 24, "num_attention_heads": 16, "head_dim": 64}}
    (tmp_path / "mistral3.json").write_text(json.dumps(config))
    recipe = yaml.safe_load((REPO / "recipes/mistral-7b/nca_ultrafeedback.yaml").read_text())
    recipe.update(model_config_file=str(tmp_path / "mistral3.json"),
                  accelerate_config=str(REPO / recipe["accelerate_config"]))
    (tmp_path / "nca.yaml").write_text(yaml.safe_dump(recipe))
    planned = plan_memory.plan(str(tmp_path / "nca.yaml"))
    assert planned["architecture"] == "Mistral3ForConditionalGeneration" and planned["strategy"] == "ZeRO-3"
    assert 23e9 < planned["params"] < 24.5e9  # about Mistral Small's 24B, its vision tower included
    assert planned["activations"] > 0 and planned["fits"]


def test_plan_memory_a_recipe_it_cannot_plan_is_one_line_exit_2(tmp_path, capsys):
    """An empty recipe or an unknown key was a traceback with exit 1, which is also the script's "does not fit"."""
    plan_memory = load_script("plan_memory")
    recipe = yaml.safe_load((REPO / "recipes/mistral-7b/nca_ultrafeedback.yaml").read_text())
    (tmp_path / "bogus.yaml").write_text(yaml.safe_dump({**recipe, "bogus_key": 1}))
    (tmp_path / "empty.yaml").write_text("")
    for name in ("bogus.yaml", "empty.yaml"):
        with pytest.raises(SystemExit) as exit_:
            plan_memory.main([str(tmp_path / name)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"error: {tmp_path / name}: " in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1, err

@pytest.mark.slow
def test_cli_end_to_end_single_process(tmp_path, capsys, monkeypatch):
    """`nca-trl make-tiny-model` then `nca-trl train` on the tiny recipe: trains, evaluates, saves a loadable model."""
    from transformers import AutoModelForCausalLM

    # The console script starts first and runs alongside the in-process run (it is mostly imports, on one core)
    with subprocess.Popen(
        [Path(sys.executable).parent / "nca-trl", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as console:
        model_dir = tmp_path / "tiny-mistral"
        assert main(["make-tiny-model", str(model_dir), "--seed", "3"]) == 0
        out = tmp_path / "run"
        argv = [
            "train", "--config", str(REPO / "recipes/tiny/nca.yaml"), "--model_name_or_path", str(model_dir),
            "--dataset_name", str(VICUNA), "--output_dir", str(out), "--max_steps", "3", "--max_length", "64",
            "--max_train_samples", "6", "--max_eval_samples", "2", "--report_train_prompts", "2", "--use_cpu", "true",
            "--logging_steps", "1",
        ]
        from nca_trl.shared_prompt.varlen import reset_kernel_choices

        reset_kernel_choices()  # chosen (and logged) once per process
        monkeypatch.setattr(logging.root, "handlers", [])  # as in the console script (pytest's capture handler off)
        assert main(argv) == 0
        monkeypatch.undo()
        captured = capsys.readouterr()
        printed = captured.out
        assert "nca-trl: NCATrainer finished" in printed and re.search(r"\n  world size +: 1 \(NO", printed)
        # The kernel that ran is named (an INFO line of the `nca_trl` logger, which no handler showed)
        assert "[nca-trl] Shared-prompt attention on cpu (float32): reference_varlen" in captured.err
        # Log lines read as text (they were dicts of quoted strings), and the evaluation at step 0 draws no bar nested
        # in the training bar (the escape codes of nested bars filled log files)
        assert "\nstep 1/3  loss " in printed and "step 0/3  eval_heldout_loss " in printed
        assert "{'loss'" not in printed and "\x1b[A" not in captured.err
        # The learning table: report_train_prompts (the recipe's 72, 2 here) evaluates training and held-out prompts at
        # both ends
        table = "| metric | training prompts: start | training prompts: end | held-out: start | held-out: end |"
        assert table in printed
        assert "| ranking accuracy | 0.000 |" in printed  # at the start the policy is its reference: nothing ranked
        curves = out / "training_curves.png"
        assert re.search(rf"\n  training curves +: {re.escape(str(curves))}\n", printed)
        assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        saved = rf"\n  model saved to +: {re.escape(str(out))}  \(AutoModelForCausalLM.from_pretrained\)"
        assert re.search(saved, printed)

        info = json.loads((out / "run_info.json").read_text())
        assert info["world_size"] == 1 and info["distributed_type"] == "NO" and info["global_step"] == 3
        assert info["model_loader"] == "AutoModelForCausalLM"  # what loads it below
        assert [s["step"] for s in info["step_losses"]] == [1, 2, 3]
        assert info["versions"]["trl"] and info["versions"]["nca-trl"] and "processes" not in info  # user-facing only
        # one key per eval set
        assert info["eval_metrics"]["eval_heldout_loss"] > 0 and "train_loss" in info["train_metrics"]
        trained = AutoModelForCausalLM.from_pretrained(out)
        initial = AutoModelForCausalLM.from_pretrained(model_dir)
        assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), initial.state_dict().values()))

        stdout, _ = console.communicate(timeout=300)
        assert console.returncode == 0 and "make-tiny-model" in stdout


def test_launch_traps_fail_loudly():
    """The settings that make a broken launch look green raise before anything is loaded."""
    from types import SimpleNamespace

    from nca_trl.runtime.errors import SettingsError
    from nca_trl.runtime.launch import check_launch_environment, check_world_size

    alone = SimpleNamespace(num_processes=1, distributed_type="NO")
    with pytest.raises(SettingsError, match="2 independent trainings"):
        check_world_size(alone, {"WORLD_SIZE": "2"})  # MULTI_GPU config, no GPU, no use_cpu
    check_world_size(alone, {})
    check_world_size(SimpleNamespace(num_processes=2, distributed_type="MULTI_CPU"), {"WORLD_SIZE": "2"})
    with pytest.raises(SettingsError, match="2 independent trainings"):  # --ddp_backend gloo: a group, but type NO
        check_world_size(SimpleNamespace(num_processes=2, distributed_type="NO"), {"WORLD_SIZE": "2"})
    # An FSDP config without `use_cpu` on a machine without GPUs: one process trained plain, exit 0, no word
    on_cpu = SimpleNamespace(num_processes=1, distributed_type="NO", device=torch.device("cpu"))
    with pytest.raises(SettingsError, match="FSDP needs GPUs: this process runs on the CPU"):
        check_world_size(on_cpu, {"ACCELERATE_USE_FSDP": "true"})
    check_world_size(on_cpu, {})
    check_world_size(SimpleNamespace(num_processes=1, distributed_type="FSDP", device=torch.device("meta")),
                     {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(ValueError, match="FSDP needs GPUs"):
        check_launch_environment(SimpleNamespace(use_cpu=True, bf16=False, fp16=False), {"ACCELERATE_USE_FSDP": "true"})

    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no"}
    with pytest.raises(ValueError, match="switches DeepSpeed off"):
        check_launch_environment(SimpleNamespace(use_cpu=True, bf16=False, fp16=False), deepspeed)
    # A SettingsError: one line on the command line (it was a traceback from every launched process), and bf16 left
    # automatic is not called "the recipe has `bf16: false`"
    with pytest.raises(SettingsError, match=r"training has `bf16` off \(set false, or left automatic: off on a CPU\)"
                       r".*--mixed_precision no"):
        check_launch_environment(
            SimpleNamespace(use_cpu=False, bf16=False, fp16=False), {**deepspeed, "ACCELERATE_MIXED_PRECISION": "bf16"}
        )
    check_launch_environment(SimpleNamespace(use_cpu=False, bf16=False, fp16=False), deepspeed)
    check_launch_environment(SimpleNamespace(use_cpu=True, bf16=False, fp16=False), {})  # plain DDP / one process


# ------------------------------------------------------------------------------------------------ a CLI that answers at once
HEAVY = ("torch", "transformers", "trl", "deepspeed", "datasets", "accelerate")


def _run_cli(*argv: str) -> dict:
    """`nca_trl.cli.main(argv)` in a fresh interpreter: exit status, output, and which heavy packages it imported."""
    code = ("import json, sys\nfrom nca_trl.cli import main\nstatus = main(sys.argv[1:])\n"
            f"print('\\n' + json.dumps({{'status': status, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(REPO)}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *out, summary = proc.stdout.rstrip("\n").split("\n")
    return {**json.loads(summary), "out": "\n".join(out), "err": proc.stderr}


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "--help", "--loss", "infonca"],
                                  ["generate", "--help"], ["score", "--help"], ["iterate", "--help"]], ids=" ".join)
def test_help_imports_nothing_heavy(argv):
    """Before: every `--help` imported torch, transformers, TRL and DeepSpeed first (14-18 s on 2 cores). Now the help
    is plain text from the dataclasses (train: rendered once, `nca_trl/train/help_texts/`)."""
    result = _run_cli(*argv)
    assert result["status"] == 0 and result["heavy"] == [], result
    assert result["out"].startswith("usage: nca-trl")
    if argv[0] != "--help":
        assert result["out"].split("\n")[0 if argv[0] != "train" else 3:][:5] and "\n  --config RECIPE.yaml\n" in \
            result["out"]


def test_recorded_settings_are_a_copy_and_the_same_on_every_process(monkeypatch):
    """The settings a finished run records (`run_info.json`) and a rerun compares: TRL sets
    `gradient_checkpointing_kwargs["use_reentrant"]` in place for LoRA under ZeRO-3, which reached the recorded copy, so
    the same command again was refused; a quantized model's `device_map` is each process's own device, so a rerun of a
    QLoRA run on several processes was refused on all but the main process (which went on and waited for them)."""
    from nca_trl.train.arguments import run_settings

    args = parse_train_args(["--config", str(REPO / "recipes/mistral-7b/nca_qlora.yaml"),
                             "--activation_checkpointing_kwargs", '{"use_reentrant": false}'], dry_run=True)
    training = args.training
    assert training.model_init_kwargs["device_map"] == {"": 0}
    settings = run_settings(args)  # taken before the run, written to run_info.json after it
    recorded = json.loads(json.dumps(settings))
    assert recorded["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    training.gradient_checkpointing_kwargs["use_reentrant"] = True  # what TRL's DPOTrainer does in place
    assert json.loads(json.dumps(settings)) == recorded
    training.gradient_checkpointing_kwargs["use_reentrant"] = False
    monkeypatch.setattr(type(training), "local_process_index", property(lambda self: 1))  # the second process
    training.model_init_kwargs["device_map"] = {"": 1}
    assert json.loads(json.dumps(run_settings(args))) == recorded


def test_version_names_the_stack_and_imports_nothing_heavy():
    """`nca-trl --version` was "unknown command": a bug report needs nca-trl's version and its stack's."""
    from importlib.metadata import version

    import nca_trl

    result = _run_cli("--version")
    assert result["status"] == 0 and result["heavy"] == [], result
    assert result["out"].startswith(f"nca-trl {nca_trl.__version__} (trl {version('trl')}, transformers "
                                    f"{version('transformers')}, torch {version('torch')}, "), result


def test_train_help_starts_with_usage_and_config_ours_first_refused_fields_not_offered():
    text = _run_cli("train", "--help")["out"]
    lines = text.split("\n")
    assert lines[0] == "usage: nca-trl train --config RECIPE.yaml [--field value ...]"
    assert lines[4] == "  --config RECIPE.yaml"
    sections = [line for line in lines if line and not line.startswith(" ") and line.endswith(":")]
    assert sections == ["nca-trl train (the loss and the data):", "NCA (NCAConfig's own fields and changed defaults):",
                        "model (trl.ModelConfig):", "dataset mixture (trl.DatasetMixtureConfig):",
                        "inherited from trl.DPOConfig and transformers.TrainingArguments (first sentence; see their "
                        "docs):"]
    assert text.index("  --alpha FLOAT") < text.index("  --learning_rate FLOAT")
    for refused in ("ld_alpha", "label_smoothing", "use_weighting", "loss_weights", "f_divergence_type"):
        assert f"  --{refused} " not in text and refused in text.split("Refused")[1]
    assert len(lines) < 600


def test_train_help_text_is_what_the_installed_stack_renders():
    """The rendered help (`python -m nca_trl.train.help`) cannot drift from the fields: regenerate it when this fails."""
    from nca_trl.config import RATED_CONFIGS
    from nca_trl.train import help as train_help

    assert train_help.LOSSES == tuple(c.loss for c in RATED_CONFIGS)
    for loss in train_help.LOSSES:
        stamp, _, text = (train_help.HELP_DIR / f"{loss}.txt").read_text().partition("\n")
        assert stamp + "\n" == train_help._stamp(), "rendered with another TRL / transformers: regenerate"
        assert text == train_help.render(loss), "stale: run `python -m nca_trl.train.help`"


@pytest.mark.parametrize("argv, message", [
    (["train"], "`nca-trl train` needs a recipe or a model and data: `nca-trl train --config RECIPE.yaml`"),
    (["train", "--config", "recipes/tiny/nca.yaml", "--learning-rat", "1"],
     "has no option --learning_rat (did you mean --learning_rate"),
    (["train", "--config", "recipes/tiny/no-such.yaml"], "no such file or folder: recipes/tiny/no-such.yaml (config)"),
    (["generate"], "`nca-trl generate` needs a recipe (`--config RECIPE.yaml`) or `--model_name_or_path`"),
    (["score", "--dataset_name", "x.jsonl", "--reward_func", "f"], "did you mean --reward_funcs"),
    (["iterate", "--round", "2"], "did you mean --rounds"),
    (["trian", "--config", "tiny/nca.yaml"], "unknown command 'trian' (did you mean 'train'?)"),
    # A refused DPO field says why: `--label_smoothing` answered "did you mean --label_smoothing_factor", a field
    # that no DPO loss applies (accepted, ignored)
    (["train", "--config", "recipes/tiny/nca.yaml", "--label_smoothing", "0.1"],
     "--label_smoothing: `label_smoothing` has no meaning for nca-trl's losses: robust DPO"),
    (["train", "--config", "recipes/tiny/nca.yaml", "--label_smoothing_factor", "0.1"],
     "`label_smoothing_factor` has no meaning for nca-trl's losses: transformers' token-level label smoothing"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_argument_errors_answer_before_anything_heavy(argv, message):
    """Before: `nca-trl train` with nothing printed transformers' bf16 traceback after 15 s of imports."""
    result = _run_cli(*argv)
    assert result["status"] == 2 and result["heavy"] == [], result
    assert message in result["err"] and "Traceback" not in result["err"]


def checkout(root: Path) -> Path:
    """A folder laid out like a fresh clone after the quick start's first steps: `data/`, `recipes/`, `examples/` of the
    repository, and the tiny model folders the recipes name (empty: the quick checks load nothing)."""
    for name in ("data", "recipes", "examples"):
        (root / name).symlink_to(REPO / name)
    for model in ("tiny-mistral", "tiny-mixtral", "tiny-digits"):
        (root / "outputs" / model).mkdir(parents=True)
    return root


def test_train_from_python_checks_paths_before_the_output_dir(tmp_path, monkeypatch):
    """`train(argv)` from Python: a missing local path is refused when the arguments are parsed, a Hub id offline
    when the run starts; both before `output_dir` is created (before: an empty `outputs/...` folder was left)."""
    from nca_trl.runtime.errors import SettingsError
    from nca_trl.train import train

    monkeypatch.chdir(checkout(tmp_path))
    base = ["--config", "recipes/tiny/nca.yaml", "--output_dir", "outputs/run"]
    with pytest.raises(SettingsError, match=r"^no such file or folder: data/does_not_exist.jsonl \(dataset_name\)$"):
        train([*base, "--dataset_name", "data/does_not_exist.jsonl"])
    with pytest.raises(SettingsError, match=r"^no such file or folder: outputs/none/ref \(ref_model_name_or_path\)$"):
        parse_train_args([*base, "--ref_model_name_or_path", "outputs/none/ref"])
    with pytest.raises(SettingsError, match=r"^org/not-cached \(model_name_or_path\) is neither a local path nor"):
        train([*base, "--model_name_or_path", "org/not-cached"])
    assert parse_train_args([*base, "--model_name_or_path", "org/not-cached", "--dry_run"]).script.dry_run
    assert not (tmp_path / "outputs" / "run").exists()


def test_train_from_python_finds_bundled_recipes_and_one_config_is_given(tmp_path, monkeypatch, capsys):
    """`train(argv)` "runs the same command": a bundled recipe's name (`tiny/nca.yaml`) from any folder raised
    FileNotFoundError there, found only by `nca-trl train`. A second `--config` was a traceback."""
    from nca_trl.cli import main
    from nca_trl.runtime.errors import SettingsError
    from nca_trl.train import train

    monkeypatch.chdir(tmp_path)  # no recipes/ here
    assert train(["--config", "tiny/nca.yaml", "--dry_run"]) is None
    assert "using the bundled recipe" in capsys.readouterr().err
    with pytest.raises(SettingsError, match=r"^`--config` given 2 times \(tiny/nca.yaml, tiny/nca_lora.yaml\): give "):
        train(["--config", "tiny/nca.yaml", "--config", "tiny/nca_lora.yaml"])
    assert main(["train", "--config", "tiny/nca.yaml", "--config=tiny/nca_lora.yaml"]) == 2
    assert capsys.readouterr().err.startswith("nca-trl train: error: `--config` given 2 times")


def test_every_shipped_recipe_and_documented_flag_passes_the_quick_check(tmp_path, monkeypatch):
    """The quick check must not refuse what the full parser takes: every recipe's keys, `--no_<bool>`, dashes (and,
    online, the Hub ids of the GPU recipes; the local paths are there)."""
    from nca_trl.train.help import check_argv

    monkeypatch.chdir(checkout(tmp_path))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    for recipe in RECIPES:
        check_argv(["--config", str(recipe)])
    check_argv(["--model_name_or_path", "m", "--dataset_name", "d", "--no_remove_unused_columns", "--use-cpu", "true",
                "--bf16=false", "--lora_r", "8", "--datasets", "[]", "--overwrite_output_dir", "true"])
    with pytest.raises(ValueError, match="Unknown key"):
        check_argv(["--config", str(REPO / "recipes/tiny/iterate_nca.yaml")])  # an iterate recipe is not a train one


def test_the_start_line_says_what_is_trained_and_evaluated():
    """Before: "[nca-trl] nca: 72 train prompts, 72 train_prompts prompts, 8 heldout prompts; ..." (each set's key as
    a word)."""
    from nca_trl.train.run import start_line

    where = {"world_size": 1, "distributed_type": "NO", "zero_stage": None, "backend": None, "device": "cpu"}
    sets = {"train_prompts": range(72), "heldout": range(8)}
    assert start_line("nca", 72, sets, where) == ("[nca-trl] nca: training on 72 prompts; evaluating 72 training "
                                                  "prompts and 8 held-out prompts; world size 1 (NO, backend None, "
                                                  "device cpu)")
    assert start_line("infonca", 10, None, where).startswith("[nca-trl] infonca: training on 10 prompts; world size 1")
    assert "; evaluating 3 held-out prompts; " in start_line("nca", 10, range(3), where)


def test_progress_log_line_is_plain_text():
    from nca_trl.runtime.progress import format_log_line

    line = format_log_line(5, 90, {"loss": 1.3862943, "learning_rate": 3e-3, "total_flos": 1e9, "epoch": 0.25})
    assert line == "step 5/90  loss 1.386  learning_rate 0.003  epoch 0.25"


def test_disable_tqdm_logs_plain_lines_too(capsys):
    """With `disable_tqdm` transformers prints each log as a dict of quoted strings (PrinterCallback): swapped for the
    same plain lines as the progress bar's."""
    from types import SimpleNamespace

    from transformers import TrainerState, TrainingArguments
    from transformers.trainer_callback import (
        CallbackHandler,
        DefaultFlowCallback,
        PrinterCallback,
        TrainerControl,
    )

    from nca_trl.runtime.progress import ReadablePrinterCallback, use_readable_progress

    handler = CallbackHandler([DefaultFlowCallback, PrinterCallback], None, None, None, None)
    use_readable_progress(SimpleNamespace(callback_handler=handler))
    assert [type(cb) for cb in handler.callbacks] == [DefaultFlowCallback, ReadablePrinterCallback]
    state = TrainerState(global_step=5, max_steps=90)
    handler.on_log(TrainingArguments("unused", report_to="none"), state, TrainerControl(), {"loss": 1.3862943})
    assert capsys.readouterr().out == "step 5/90  loss 1.386\n"


def test_a_users_subclass_of_the_printer_or_progress_callback_is_kept():
    """`remove_callback(PrinterCallback)` removes the first instance of the class, subclasses included: a user's
    `MyPrinter(PrinterCallback)` was dropped and transformers' default kept beside the readable one."""
    from types import SimpleNamespace

    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, PrinterCallback, ProgressCallback

    from nca_trl.runtime.progress import ReadablePrinterCallback, ReadableProgressCallback, use_readable_progress

    class MyPrinter(PrinterCallback):
        pass

    class MyProgress(ProgressCallback):
        pass

    for mine, default, readable in ((MyPrinter, PrinterCallback, ReadablePrinterCallback),
                                    (MyProgress, ProgressCallback, ReadableProgressCallback)):
        handler = CallbackHandler([DefaultFlowCallback, mine, default], None, None, None, None)
        use_readable_progress(SimpleNamespace(callback_handler=handler))
        assert [type(cb) for cb in handler.callbacks] == [DefaultFlowCallback, mine, readable]


@pytest.mark.slow  # over a few seconds on 2 cores
def test_deepspeed_cpu_notice_only_where_deepspeed_is_used(tmp_path):
    """accelerate imports DeepSpeed whenever it is installed: every command printed "Setting accelerator to CPU. If
    you have GPU or other accelerator, we were unable to detect it.", also without DeepSpeed."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    code = "import sys\nfrom nca_trl.cli import main\nsys.exit(main(sys.argv[1:]))"
    plain = subprocess.run([sys.executable, "-c", code, "make-tiny-model", str(tmp_path / "m")], capture_output=True,
                           text=True, timeout=300, env=env)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "Setting accelerator to CPU" not in plain.stdout + plain.stderr
    launched = subprocess.run([sys.executable, "-c", code, "make-tiny-model", str(tmp_path / "m2")],
                              capture_output=True, text=True, timeout=300, env={**env, "ACCELERATE_USE_DEEPSPEED": "true"})
    assert launched.returncode == 0 and "Setting accelerator to CPU" in launched.stdout + launched.stderr


def test_deepspeed_on_cpu_builds_no_inference_kernel(monkeypatch):
    """DeepSpeed's backend compiled its shared-memory all-reduce (a C++ extension, about a minute, a compiler required)
    at the start of every CPU DeepSpeed launch, for a kernel only its inference tensor parallelism calls. Under a
    DeepSpeed launch on CPU it is not built (test_distributed's ZeRO-2 launch finds no build); elsewhere DeepSpeed is
    as it was."""
    import importlib

    from nca_trl.runtime.environment import skip_deepspeed_cpu_shm_build

    backend = importlib.import_module("deepspeed.comm.torch")
    original = backend.build_shm_op
    monkeypatch.setattr(backend, "build_shm_op", original)  # restored after the test
    assert not skip_deepspeed_cpu_shm_build({}) and backend.build_shm_op is original
    assert not skip_deepspeed_cpu_shm_build({"ACCELERATE_USE_DEEPSPEED": "false"}) and backend.build_shm_op is original
    with monkeypatch.context() as broken:  # a DeepSpeed that fails to import fails later, where accelerate imports it
        broken.setitem(sys.modules, "deepspeed.accelerator", None)
        assert not skip_deepspeed_cpu_shm_build({"ACCELERATE_USE_DEEPSPEED": "true"})
        assert backend.build_shm_op is original
    assert skip_deepspeed_cpu_shm_build({"ACCELERATE_USE_DEEPSPEED": "true"})
    assert backend.build_shm_op() is None


@pytest.mark.parametrize("loss", ["nca", "infonca"])
def test_paper_recipe_uses_the_papers_one_hot_targets(loss):
    """The recipe that claims the paper's setup has the authors' released behaviour (temperature_alpha 1e-4 on 1-10
    scores: the one-hot limit, alpha 0); the graded-target variant is its own recipe, otherwise the same run."""
    paper_path = REPO / "recipes" / "mistral-7b" / f"{loss}_ultrafeedback.yaml"
    graded_path = REPO / "recipes" / "mistral-7b" / f"{loss}_ultrafeedback_graded.yaml"
    assert "the paper's setup" in paper_path.read_text().splitlines()[0]
    assert "not the paper's setting" in graded_path.read_text()
    paper, graded = (yaml.safe_load(p.read_text()) for p in (paper_path, graded_path))
    assert paper["alpha"] == 0.0 and graded["alpha"] == 1.0
    assert graded["output_dir"] != paper["output_dir"]
    same = {k: v for k, v in paper.items() if k not in ("alpha", "output_dir")}
    assert same == {k: v for k, v in graded.items() if k not in ("alpha", "output_dir")}


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "recipes/tiny/nca.yaml", "--beta", "-1"], "`beta` must be a finite number > 0, got -1.0."),
    # inf trained every weight to NaN and saved them, exit 0; nan failed inside torch's Adam after the model loaded
    (["train", "--config", "recipes/tiny/nca.yaml", "--learning_rate", "inf"], "`learning_rate` must be a finite"),
    (["train", "--config", "recipes/tiny/nca.yaml", "--learning_rate", "nan"], "`learning_rate` must be a finite"),
    (["train", "--config", "recipes/tiny/nca.yaml", "--beta", "inf"], "`beta` must be a finite number > 0, got inf"),
    (["train", "--config", "recipes/tiny/nca.yaml", "--weight_decay", "nan"], "(or `--weight_decay nan`) is not a finite"),
    (["train", "--config", "recipes/tiny/nca.yaml", "--weight_decay", "inf"], "(or `--weight_decay inf`) is not a finite"),
    # trained no step and saved the initial model as a finished run, exit 0
    (["train", "--config", "recipes/tiny/nca.yaml", "--num_train_epochs", "0", "--max_steps", "-1"],
     "(or `--num_train_epochs 0.0`) without `max_steps` trains no step"),
    (["generate", "--model_name_or_path", "outputs/tiny-mistral", "--dataset_name", "data/sort_prompts.jsonl", "--output",
      "outputs/never.jsonl", "--num_completions", "1"], "`num_completions` must be at least 2, got 1"),
    (["score", "--dataset_name", "data/vicuna_rated.jsonl", "--output", "outputs/never.jsonl", "--reward_funcs",
      "no_such_module:f"], "Reward function 'no_such_module:f': no module named 'no_such_module'"),
    (["iterate", "--config", "recipes/tiny/iterate_nca.yaml", "--training", '{"learnig_rate": 1}'],
     "'learnig_rate' (did you mean 'learning_rate'?)"),
    # these three were tracebacks (exit 1) once the data and the model had loaded
    (["train", "--config", "recipes/tiny/nca.yaml", "--neftune_noise_alpha", "5", "--shared_prompt", "true"],
     "(or `--shared_prompt true`) requires the shared-prompt layout, which cannot run exactly here: `neftune"),
    (["train", "--config", "recipes/tiny/nca.yaml", "--sync_ref_model", "true", "--precompute_ref_log_probs", "true"],
     "the reference is updated during training, so precomputed reference log-probs would go stale"),
    (["train", "--config", "recipes/tiny/nca_lora.yaml", "--sync_ref_model", "true"],
     "`sync_ref_model: true` with `use_peft: true`: with an adapter the reference is the base model"),
], ids=["train", "lr-inf", "lr-nan", "beta-inf", "nan", "inf", "epochs-0", "generate", "score", "iterate",
        "shared-prompt-neftune", "sync-precompute", "sync-peft"])
def test_a_refused_setting_is_one_line_and_exit_2(argv, message, capsys, monkeypatch, tmp_path):
    """A setting refused while the arguments are parsed (after the fast flag and path checks, before anything is
    written or loaded) is `nca-trl CMD: error: MESSAGE` and exit 2, not a traceback through the parser."""
    from nca_trl.cli import main

    monkeypatch.chdir(checkout(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nca-trl {argv[0]}: error: ") and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_dir_lists_the_lazy_public_names_without_importing_them():
    """`dir(nca_trl)` (tab completion) listed only `lazy_exports`, `quiet_deepspeed_cpu_notice` and `runtime`: the
    trainers are imported on first use. It lists every public name now, still importing nothing heavy."""
    code = ("import json, sys, nca_trl, nca_trl.generation, nca_trl.scoring\n"
            "print(json.dumps({'top': dir(nca_trl), 'generation': dir(nca_trl.generation), "
            f"'scoring': dir(nca_trl.scoring), 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(REPO)})
    listed = json.loads(proc.stdout)
    import nca_trl.generation
    import nca_trl.scoring

    assert set(nca_trl.__all__) <= set(listed["top"]) and "NCATrainer" in listed["top"]
    assert set(nca_trl.generation.__all__) <= set(listed["generation"])
    assert set(nca_trl.scoring.__all__) <= set(listed["scoring"]) and listed["heavy"] == []


@pytest.mark.parametrize("local_rank, said", [("0", ["notice", "failure"]), ("1", ["failure"]), (None, ["notice",
                                                                                                         "failure"]),
                                              ("-1", ["notice", "failure"])])  # -1: not distributed (transformers)
def test_a_launch_says_nca_trls_notices_once_per_machine(local_rank, said):
    """Every launched process prepared the same data and printed the same notices (8 times on 8 GPUs); the processes
    other than each machine's first (LOCAL_RANK != 0) keep only errors."""
    code = ("import logging, nca_trl\nlogging.basicConfig(format='%(message)s')\n"
            "log = logging.getLogger('nca_trl')\nlog.warning('notice')\nlog.error('failure')")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO), **({"LOCAL_RANK": local_rank} if local_rank else {})}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.stderr.split() == said, proc.stderr


def test_the_summary_names_the_curves_by_their_full_path(capsys, tmp_path, monkeypatch):
    """The end-of-run summary printed every path in full but the training curves' (relative to where it ran)."""
    from nca_trl.train.report import print_summary

    monkeypatch.chdir(tmp_path)
    info = {"distributed_type": "NO", "zero_stage": None, "train_metrics": {}, "trainer": "NCATrainer",
            "global_step": 1, "world_size": 1, "backend": None, "output_dir": str(tmp_path / "run"),
            "model_loader": "AutoModelForCausalLM", "eval_metrics": {}}
    print_summary(info, None, "run/training_curves.png")
    assert f"training curves  : {tmp_path / 'run' / 'training_curves.png'}\n" in capsys.readouterr().out


def test_the_summary_lines_up_its_evaluation_losses(capsys, tmp_path):
    """'eval train prompts loss' is longer than the other labels: its colon stood two columns right of theirs, and the
    evaluation sets were listed in reverse order."""
    from nca_trl.train.report import print_summary

    info = {"distributed_type": "NO", "zero_stage": None, "train_metrics": {"train_loss": 1.0}, "trainer": "NCATrainer",
            "global_step": 1, "world_size": 1, "backend": None, "output_dir": str(tmp_path / "run"),
            "model_loader": "AutoModelForCausalLM",
            "eval_metrics": {"eval_heldout_loss": 1.5, "eval_heldout_runtime": 1.0, "eval_train_prompts_loss": 1.25}}
    print_summary(info, None, str(tmp_path / "curves.png"))
    fields = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert [line.split(":")[0].strip() for line in fields][:3] == ["train loss", "eval heldout loss",
                                                                    "eval train prompts loss"]
    assert len({line.index(" : ") for line in fields}) == 1, fields


@pytest.mark.parametrize("value, read", [("false", None), ("False", None), ("none", None), ("null", None),
                                         (False, None), ("true", "true"), ("latest", "true"), (True, "true"),
                                         ("runs/checkpoint-2", "runs/checkpoint-2")])
def test_resume_from_checkpoint_false_means_no_resume(tmp_path, value, read):
    """`--resume_from_checkpoint false` was taken for a checkpoint folder named "false" (transformers raised once the
    model and data had loaded), and `resume_from_checkpoint: false` in a recipe for a resume (a finished run of other
    settings was trained over)."""
    recipe = yaml.safe_load((REPO / "recipes" / "tiny" / "nca.yaml").read_text())
    recipe["resume_from_checkpoint"] = value
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "model").mkdir()
    common = ["--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(VICUNA), "--dry_run", "true"]
    assert parse_train_args(["--config", str(tmp_path / "recipe.yaml"), *common]).training.resume_from_checkpoint == read
    if not isinstance(value, bool):
        argv = ["--config", str(REPO / "recipes" / "tiny" / "nca.yaml"), *common, "--resume_from_checkpoint", value]
        assert parse_train_args(argv).training.resume_from_checkpoint == read


def test_an_output_dir_that_is_a_file_is_one_line_exit_2(tiny_mistral, tmp_path, capsys):
    """`OutputDirError` (an `OSError`) was not among the errors the command line tells in one line: a traceback,
    exit 1, though its message says what to do."""
    (tmp_path / "afile").write_text("x")
    argv = ["train", "--config", str(REPO / "recipes" / "tiny" / "nca.yaml"), "--model_name_or_path",
            str(tiny_mistral), "--dataset_name", str(REPO / "data" / "vicuna_rated.jsonl"), "--output_dir",
            str(tmp_path / "afile")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nca-trl train: error: output_dir " in err and "is not writable" in err and "Traceback" not in err


def test_a_refused_field_at_its_default_passes_as_from_python(tmp_path, capsys):
    """A DPO recipe's `label_smoothing_factor: 0.0` (its default: nothing to refuse) was refused on the command line,
    where `NCAConfig(label_smoothing_factor=0.0)` passes; off its default it is refused saying why."""
    recipe = tmp_path / "dpo_like.yaml"
    recipe.write_text((REPO / "recipes/tiny/nca.yaml").read_text() + "label_smoothing_factor: 0.0\nlabel_smoothing: 0\n")
    assert main(["train", "--config", str(recipe), "--ld_alpha", "null", "--dry_run", "true"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", str(recipe), "--label_smoothing", "0.2", "--dry_run", "true"]) == 2
    assert "--label_smoothing: `label_smoothing` has no meaning" in capsys.readouterr().err


def test_the_command_line_shows_the_library_log_only_where_nothing_else_does(monkeypatch, capsys):
    """The `[nca-trl] ...` handler of the command line: added for the command where no logging is set up (the console
    script), removed after it; where a program that calls `main` set up logging (a root handler), nothing is added:
    every record printed twice, and INFO lines got past the program's WARNING level."""
    from nca_trl.cli import _library_log

    log = logging.getLogger("nca_trl")
    monkeypatch.setattr(logging.root, "handlers", [])
    with _library_log():
        log.info("the kernel")
        assert len(log.handlers) == 1
    assert not log.handlers and log.level == logging.NOTSET
    assert capsys.readouterr().err == "[nca-trl] the kernel\n"
    program = logging.StreamHandler()
    monkeypatch.setattr(logging.root, "handlers", [program])
    with _library_log():
        assert not log.handlers


def test_ctrl_c_is_one_line_saying_how_to_continue(monkeypatch, capsys):
    """Ctrl-C in `nca-trl train` printed a 30-line KeyboardInterrupt traceback through the library, and nothing said
    that the run continues with `--resume_from_checkpoint true`."""
    import nca_trl.train

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(nca_trl.train, "train", interrupted)  # what the command runs
    assert main(["train", "--config", str(REPO / "recipes/tiny/nca.yaml"), "--dry_run", "true"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("nca-trl train: interrupted. Continue from the last complete checkpoint") and \
        "--resume_from_checkpoint true" in err and "Traceback" not in err


def test_sigterm_ends_a_command_as_ctrl_c_does(monkeypatch, capsys):
    """SIGTERM (a scheduler's preemption or time limit) ended `nca-trl train` with no word (exit -15): now the line
    saying how the run continues, exit 143, and SIGTERM's default action back afterwards."""
    import os
    import signal

    import nca_trl.train

    def terminated(argv):
        # A child forked by the command (a reward function's worker) keeps SIGTERM's default action: `terminate()`
        # ends it at once (the handler, inherited, made it raise where it could be caught, and outlive `join(5)`)
        import multiprocessing
        import time

        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
        time.sleep(0.2)
        child.terminate()
        child.join(5)
        assert child.exitcode == -signal.SIGTERM, child.exitcode
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a shell; restored below
    try:
        monkeypatch.setattr(nca_trl.train, "train", terminated)
        assert main(["train", "--config", str(REPO / "recipes/tiny/nca.yaml"), "--dry_run", "true"]) == 143
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert err.startswith("nca-trl train: terminated (SIGTERM). Continue from the last complete checkpoint") and \
        "--resume_from_checkpoint true" in err and "Traceback" not in err
