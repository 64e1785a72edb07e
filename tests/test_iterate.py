"""`nca-trl iterate` (generate -> score -> train rounds) and `nca-trl train --ref_model_name_or_path`."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, VICUNA, load_script

from nca_trl.cli import main
from nca_trl.iterate import IterateArguments, parse_iterate_args, plan_rounds
from nca_trl.iterate.evaluate import completion_logps
from nca_trl.iterate.stages import best_worst_pairs

ASCII = "nca_trl.scoring.functions:ascii_letters"


def _train_argv(model, out, **extra):
    argv = ["train", "--model_name_or_path", str(model), "--dataset_name", str(VICUNA), "--output_dir", str(out),
            "--max_steps", "1", "--max_length", "48", "--max_train_samples", "4", "--per_device_train_batch_size", "2",
            "--logging_steps", "1", "--use_cpu", "true", "--bf16", "false", "--activation_checkpointing", "false",
            "--save_strategy", "no", "--report_to", "none", "--learning_rate", "0"]
    for key, value in extra.items():
        argv += [f"--{key}", str(value)]
    return argv


@pytest.mark.slow  # over a few seconds on 2 cores
def test_train_uses_the_reference_model_it_is_given(tiny_mistral, tiny_mistral_ref, tmp_path):
    """At the first step the policy is the initial model: with the implicit reference every implicit reward is 0;
    with `ref_model_name_or_path` (other weights) they are not, and they are beta * (log pi - log pi_ref) of that
    model."""
    assert main(_train_argv(tiny_mistral, tmp_path / "implicit")) == 0
    assert main(_train_argv(tiny_mistral, tmp_path / "explicit", ref_model_name_or_path=tiny_mistral_ref)) == 0
    first = {}
    for name in ("implicit", "explicit"):
        history = json.loads((tmp_path / name / "run_info.json").read_text())["log_history"]
        first[name] = next(e for e in history if "rewards/chosen" in e)
    assert first["implicit"]["rewards/chosen"] == 0 and first["implicit"]["rewards/margins"] == 0
    assert abs(first["explicit"]["rewards/chosen"]) > 1e-3
    assert first["explicit"]["logps/chosen"] == pytest.approx(first["implicit"]["logps/chosen"])  # same policy


def _args(**kw):
    defaults = dict(model_name_or_path="m", dataset_name="d", output_dir="o", reward_funcs=[ASCII])
    return IterateArguments(**{**defaults, **kw})


def test_rounds_take_disjoint_slices_before_the_heldout_prompts():
    per_round, heldout = plan_rounds(100, _args(rounds=3, heldout_prompts=10))
    assert per_round == 30 and heldout == range(90, 100)
    assert plan_rounds(100, _args(rounds=2, heldout_prompts=10, prompts_per_round=45))[0] == 45
    with pytest.raises(ValueError, match="3 rounds x 40 prompts need 120 training prompts.*100 prompts, 10 of them"):
        plan_rounds(100, _args(rounds=3, heldout_prompts=10, prompts_per_round=40))
    with pytest.raises(ValueError, match="none left for training"):
        plan_rounds(10, _args(heldout_prompts=10))


def test_iterate_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="Give a reward"):
        IterateArguments(model_name_or_path="m", dataset_name="d", output_dir="o")
    with pytest.raises(ValueError, match="`loss` must be one of"):
        _args(loss="ipo")
    with pytest.raises(ValueError, match=r"`training` sets \['output_dir'\]"):
        _args(training={"output_dir": "x"})
    with pytest.raises(ValueError, match="`training.use_peft` with `loss: dpo` is not supported"):
        _args(training={"use_peft": True}, loss="dpo")
    assert _args(training={"use_peft": True}).training["use_peft"]
    with pytest.raises(ValueError, match="`training.load_in_4bit` with `loss: dpo` is not supported"):
        _args(training={"load_in_4bit": "true"}, loss="dpo")
    assert _args(training='{"beta": 0.5}').training == {"beta": 0.5}
    with pytest.raises(ValueError, match="num_completions"):
        _args(num_completions=1)
    # Not a dtype, in a recipe (argparse's choices check the command line only): refused here; it failed with an
    # AttributeError after iterate.json was written, which then refused the corrected command as other settings
    recipe = tmp_path / "fp16.yaml"
    recipe.write_text((REPO / "recipes/tiny/iterate_nca.yaml").read_text() + "generation_dtype: fp16\n")
    with pytest.raises(ValueError, match=r"`dtype` must be one of auto, bfloat16, float16, float32, got 'fp16'"):
        parse_iterate_args(["--config", str(recipe)])


def test_best_worst_pairs_keep_the_first_of_ties_and_drop_rows_without_a_preference():
    rows = [{"prompt": "p", "completions": ["a", "b", "c", "d"], "rewards": [1.0, 3.0, 3.0, 0.0]},
            {"prompt": "q", "completions": ["e", "f"], "rewards": [2.0, 2.0]},
            {"prompt": "s", "completions": ["g", "h", "i"], "rewards": [0.0, 0.0, 1.0]}]
    pairs, ties = best_worst_pairs(rows)
    assert ties == 1
    assert pairs == [{"prompt": "p", "chosen": "b", "rejected": "d"}, {"prompt": "s", "chosen": "i", "rejected": "g"}]


def test_completion_logps_equal_one_sequence_at_a_time(tiny_mistral):
    """Batched, padded log-probs of the KL proxy equal each sequence alone, and their hand-computed sum."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_mistral).eval()
    items = [([1, 5, 9, 200], [17, 33, 2]), ([1, 7], [40, 41, 42, 43, 2]), ([1, 300, 301, 302, 303, 304], [2])]
    batched = completion_logps(model, items, pad_id=0, batch_size=3)
    alone = [completion_logps(model, [item], pad_id=0)[0] for item in items]
    assert batched == pytest.approx(alone, abs=1e-4)
    prompt, completion = items[1]
    ids = torch.tensor([prompt + completion])
    logps = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
    assert alone[1] == pytest.approx(logps[len(prompt) - 1:].sum().item(), abs=1e-4)


# ------------------------------------------------------------------------------------------- the loop, end to end
SORT_PROMPTS = REPO / "data" / "sort_prompts.jsonl"


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """A random tiny Mistral over the 14-token digits vocabulary (the sorting task of the tiny iterate recipe)."""
    from nca_trl.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("digits"), seed=0, max_position_embeddings=64, vocab="digits")


def _recipe(tmp_path, model, out, name="iterate_nca.yaml", **overrides):
    """The tiny iterate recipe `name`, made smaller: 2 rounds x 16 prompts, 8 held out."""
    recipe = yaml.safe_load((REPO / "recipes" / "tiny" / name).read_text())
    recipe.update(model_name_or_path=str(model), dataset_name=str(SORT_PROMPTS), output_dir=str(out), rounds=2,
                  prompts_per_round=16, heldout_prompts=8)
    recipe["training"].update(num_train_epochs=1, per_device_train_batch_size=4, use_cpu=True, disable_tqdm=True)
    for key, value in overrides.items():
        if key == "training":
            recipe["training"].update(value)
        else:
            recipe[key] = value
    path = tmp_path / f"{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _iterate_process(recipe, out, *extra):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "nca_trl.cli", "iterate", "--config", str(recipe), *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _status(out, r):
    path = Path(out) / f"round-{r}" / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _kill_in_round_two_training(recipe, out):
    """Run the recipe and SIGKILL it (nothing gets to clean up) once round 2's training wrote a complete checkpoint."""
    proc = _iterate_process(recipe, out)
    deadline = time.time() + 400
    while proc.poll() is None and time.time() < deadline:
        if list((out / "round-2" / "model").glob("checkpoint-*/nca_trl_complete.json")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == -signal.SIGKILL, log[-3000:]


@pytest.mark.slow
def test_two_round_iterate_resumes_after_a_kill_in_round_two(digits_model, tmp_path):
    """Run 1 is killed (SIGKILL: nothing gets to clean up) in round 2, once its training has written a complete
    checkpoint; run 2, the same command, skips round 0 and 1 (their files untouched), does not sample or score round 2
    again, resumes round 2's training from the checkpoint and finishes with the table and the plot."""
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, digits_model, out, training={"save_strategy": "steps", "save_steps": 1})

    _kill_in_round_two_training(recipe, out)
    assert set(_status(out, 1)) == {"generate", "score", "train", "eval"}
    assert set(_status(out, 2)) == {"generate", "score"}, "the kill came after round 2's training had finished"
    done = {p: p.stat().st_mtime_ns for p in (*(out / "round-0").rglob("*"), *(out / "round-1").rglob("*"),
                                              out / "round-2" / "samples.jsonl", out / "round-2" / "rated.jsonl")
            if p.is_file()}

    proc = _iterate_process(recipe, out)
    log2 = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log2[-3000:]
    assert "round 0: done" in log2 and "round 1: done" in log2 and "--resume_from_checkpoint true" in log2
    assert "round-2/samples.jsonl" not in log2.split("nca-trl generate")[1].split("\n")[0]  # only the eval sampled
    assert "round-2/rated.jsonl" not in log2  # round 2's samples were not scored again
    assert {p: p.stat().st_mtime_ns for p in done} == done
    info = json.loads((out / "round-2" / "model" / "run_info.json").read_text())
    assert info["global_step"] == 4  # 16 prompts / 4 per step, one epoch: the resumed run finished the same steps
    results = json.loads((out / "iterate_results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    assert results["rounds"][0]["kl_to_initial"] == 0 and results["rounds"][2]["kl_to_initial"] != 0
    assert all(0 <= r["reward_mean"] <= r["reward_best_of_k"] <= 1 for r in results["rounds"])
    # Every held-out sample is scored, empty ones too (0 for sorted_digits): they were left out of the mean before
    assert all(r["completions_scored"] == r["prompts"] * 4 and r["prompts_scored"] == r["prompts"]
               for r in results["rounds"])
    assert all(r["empty_completions"] >= 0 for r in results["rounds"])
    # Round 2 starts from round 1's policy, against the initial model as its reference (`reference: initial`)
    train2 = yaml.safe_load((out / "round-2" / "train.yaml").read_text())
    assert train2["model_name_or_path"] == str(out / "round-1" / "model")
    assert train2["ref_model_name_or_path"] == str(digits_model)
    assert (out / "iterate_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| round | trained on | mean reward | best-of-K | KL to initial | length (tokens) | empty |" in log2

    # Settings that change samples or updates cannot be changed on a restart
    from nca_trl.iterate import iterate

    with pytest.raises(ValueError, match="other settings.*seed: 0 -> 5"):
        iterate(["--config", str(recipe), "--seed", "5"])

    # A round evaluated by an nca-trl that left empty answers out of the mean is evaluated again, not mixed in
    status = json.loads((out / "round-1" / "status.json").read_text())
    del status["eval"]["empty_completions"]
    (out / "round-1" / "status.json").write_text(json.dumps(status))
    rounds = iterate(["--config", str(recipe)])["rounds"]
    assert all("empty_completions" in r for r in rounds) and rounds[1]["reward_mean"] == results["rounds"][1][
        "reward_mean"]


@pytest.mark.slow
def test_iterate_with_the_dpo_baseline_trains_trl_dpo_on_best_vs_worst(digits_model, tmp_path):
    """`loss: dpo` runs trl.DPOTrainer on each prompt's best-vs-worst pair (ties left out, counted) in the same loop,
    with `reference: previous`; the NCA-only `alpha` of the recipe is ignored and said so."""
    from transformers import AutoModelForCausalLM

    from nca_trl.iterate import iterate

    out = tmp_path / "dpo"
    summary = iterate(["--config", str(_recipe(tmp_path, digits_model, out, rounds=1, loss="dpo",
                                               reference="previous"))])
    status = _status(out, 1)
    assert status["train"]["loss"] == "dpo"
    rated = [json.loads(line) for line in (out / "round-1" / "rated.jsonl").read_text().splitlines()]
    ties = sum(max(r["rewards"]) == min(r["rewards"]) for r in rated)
    assert status["train"]["ties_left_out"] == ties and status["train"]["train_prompts"] == len(rated) - ties
    assert not (out / "round-1" / "train.yaml").exists()  # not nca-trl train
    trained = AutoModelForCausalLM.from_pretrained(out / "round-1" / "model")
    initial = AutoModelForCausalLM.from_pretrained(digits_model)
    assert any((a != b).any() for a, b in zip(trained.state_dict().values(), initial.state_dict().values()))
    assert [r["round"] for r in summary["rounds"]] == [0, 1]

    # The finished run, one more round: round 1 is kept as it is, round 2 starts from its policy
    kept = {p: p.stat().st_mtime_ns for p in (out / "round-1").rglob("*") if p.is_file()}
    summary = iterate(["--config", str(out.parent / "dpo.yaml"), "--rounds", "2"])
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2] and _status(out, 2)["train"]["loss"] == "dpo"
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


def test_iterate_recipes_parse_and_their_training_fits(tmp_path):
    """Both shipped iterate recipes parse; each round's `nca-trl train` recipe parses with the real parser; the
    Mistral-7B recipe's training stage fits its 8 x 80 GB with K=4 (scripts/plan_memory.py)."""
    
    from trl import DPOConfig

    from nca_trl.iterate import parse_iterate_args
    from nca_trl.train.arguments import TrainArgs

    tiny = parse_iterate_args(["--config", str(REPO / "recipes/tiny/iterate_nca.yaml")])
    assert tiny.model_name_or_path == "outputs/tiny-digits" and (REPO / tiny.dataset_name).exists()
    assert tiny.reward_funcs == ["nca_trl.scoring.functions:sorted_digits"]
    assert plan_rounds(200, tiny) == (40, range(168, 200))
    # A GPU recipe fails here at parse time, before anything is written (no bf16 GPU), unless in a dry run
    with pytest.raises(ValueError, match="bf16"):
        parse_iterate_args(["--config", str(REPO / "recipes/mistral-7b/iterate_nca.yaml")])
    big = parse_iterate_args(["--config", str(REPO / "recipes/mistral-7b/iterate_nca.yaml")], dry_run=True)
    assert big.reward_model and big.num_completions == 4 and big.loss == "nca" and big.reference == "previous"
    # Every stage's arguments are built once, as objects, from the recipe
    for args in (tiny, big):
        stages = args.stages
        assert isinstance(stages.train, TrainArgs) and stages.train.script.loss == args.loss
        assert type(stages.train.training).loss == args.loss and stages.train.training.seed == args.training.get("seed", args.seed)
        assert stages.generate.num_completions == args.num_completions and stages.generate.seed == args.seed
        assert stages.score.reward_funcs == list(args.reward_funcs or []) and stages.score.reward_model == args.reward_model
    dpo = parse_iterate_args(["--config", str(REPO / "recipes/tiny/iterate_nca.yaml"), "--loss", "dpo"])
    assert type(dpo.stages.train) is DPOConfig and "alpha" not in vars(dpo.stages.train)
    # A bad training field fails at parse time, naming it
    with pytest.raises(ValueError, match="learnig_rate"):
        parse_iterate_args(["--config", str(REPO / "recipes/tiny/iterate_nca.yaml"), "--training",
                            '{"learnig_rate": 1e-4}'])
    # A boolean given as a string is read as `nca-trl train --config` reads it (it stayed the string, "false" true)
    strings = parse_iterate_args(["--config", str(REPO / "recipes/tiny/iterate_nca.yaml"), "--training",
                                  '{"use_peft": "false", "trust_remote_code": "no", "bf16": "False"}'])
    assert strings.stages.train.model.use_peft is False and strings.stages.train.training.trust_remote_code is False
    assert strings.stages.train.training.bf16 is False and strings.stages.generate.trust_remote_code is False
    with pytest.raises(ValueError, match=r"`use_peft` in the `training:` mapping of the iterate run is a boolean: "
                       r"true or false, got 'maybe'"):
        parse_iterate_args(["--config", str(REPO / "recipes/tiny/iterate_nca.yaml"), "--training",
                            '{"use_peft": "maybe"}'])
    # The same for `loss: dpo`: a DPOConfig takes its values as given (bf16 "false" was refused on a CPU)
    dpo_strings = parse_iterate_args(["--config", str(REPO / "recipes/tiny/iterate_nca.yaml"), "--loss", "dpo",
                                      "--training", '{"trust_remote_code": "false", "gradient_checkpointing": "false", '
                                      '"bf16": "false"}'])
    assert dpo_strings.stages.train.trust_remote_code is False and dpo_strings.stages.train.bf16 is False
    assert dpo_strings.stages.train.gradient_checkpointing is False
    assert dpo_strings.stages.generate.trust_remote_code is False
    # An NCA recipe's LoRA settings, switched off, run as `loss: dpo` (they were refused as unknown fields)
    lora_off = parse_iterate_args(["--config", str(REPO / "recipes/tiny/iterate_nca_lora.yaml"), "--loss", "dpo",
                                   "--training", '{"use_peft": "false", "lora_r": 4, "load_in_4bit": false}'])
    assert type(lora_off.stages.train) is DPOConfig
    assert {"use_peft", "lora_r", "load_in_4bit"} <= set(lora_off.stages.ignored_training_fields)
    # A field that takes strings too keeps the ones that are not booleans, and reads the booleans
    counted = parse_iterate_args(["--config", str(REPO / "recipes/tiny/iterate_nca.yaml"), "--training",
                                  '{"include_num_input_tokens_seen": "false"}'])
    assert counted.stages.train.training.include_num_input_tokens_seen == "no"  # what --config makes of it
    counted = parse_iterate_args(["--config", str(REPO / "recipes/tiny/iterate_nca.yaml"), "--training",
                                  '{"include_num_input_tokens_seen": "non_padding"}'])
    assert counted.stages.train.training.include_num_input_tokens_seen == "non_padding"
    # A repeated `--reward_funcs` / `--reward_weights` gives each flag's values, as `nca-trl score` takes them (the last
    # flag's alone were kept: a run scored by one function of the two asked, exit 0)
    funcs = ["nca_trl.scoring.functions:sorted_digits", "nca_trl.scoring.functions:ascii_letters"]
    repeated = parse_iterate_args(["--config", str(REPO / "recipes/tiny/iterate_nca.yaml"), "--reward_funcs", funcs[0],
                                   "--reward_weights", "1", "--reward_funcs", funcs[1], "--reward_weights", "0.5"])
    assert repeated.reward_funcs == funcs and repeated.reward_weights == [1.0, 0.5]
    assert repeated.stages.score.reward_funcs == funcs
    plan_memory = load_script("plan_memory")
    plan = plan_memory.plan(str(REPO / "recipes/mistral-7b/iterate_nca.yaml"))
    assert plan["fits"] and plan["completions"] == 4 and plan["strategy"] == "ZeRO-3" and plan["gpu_mem_gb"] == 80
    dpo_recipe = tmp_path / "iterate_dpo.yaml"  # planned as NCA on pairs; it was labelled "nca"
    dpo_recipe.write_text((REPO / "recipes/mistral-7b/iterate_nca.yaml").read_text().replace("\nloss: nca", "\nloss: dpo"))
    dpo_plan = plan_memory.plan(str(dpo_recipe))
    assert dpo_plan["loss"] == "dpo" and dpo_plan["completions"] == 2 and plan["loss"] == "nca"
    # The LoRA recipes: the tiny one runs here (below); the Mistral-7B QLoRA one fits one 24 GB GPU
    lora = parse_iterate_args(["--config", str(REPO / "recipes/tiny/iterate_nca_lora.yaml")])
    assert lora.stages.train.model.use_peft and lora.reference == "initial"
    qlora = parse_iterate_args(["--config", str(REPO / "recipes/mistral-7b/iterate_nca_qlora.yaml")], dry_run=True)
    assert qlora.stages.train.model.load_in_4bit and qlora.stages.train.model.use_peft
    plan = plan_memory.plan(str(REPO / "recipes/mistral-7b/iterate_nca_qlora.yaml"))
    assert plan["fits"] and plan["gpu_mem_gb"] == 24 and plan["strategy"].startswith("QLoRA")


@pytest.mark.slow
@pytest.mark.distributed
def test_iterate_under_a_two_process_launch(digits_model, tmp_path, launch_env):
    """`accelerate launch` with 2 CPU processes: both sample their share and train (DDP over gloo), the main process
    scores and evaluates; the held-out samples are the ones one process draws (seeded per completion)."""
    from launching import cpu_config, free_port, launch_cmd

    from nca_trl.generation import generate

    out = tmp_path / "launched"
    recipe = _recipe(tmp_path, digits_model, out, rounds=1, training={"ddp_backend": "gloo"})
    accel = cpu_config(tmp_path / "ddp_cpu.yaml")
    cmd = launch_cmd(accel, free_port(), ("--num_processes", "2"), ("-m", "nca_trl.cli", "iterate", "--config",
                                                                    str(recipe)))
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("round 1: held-out reward") == 1  # printed by the main process only
    info = json.loads((out / "round-1" / "model" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["distributed_type"] == "MULTI_CPU"
    stats = json.loads((out / "round-1" / "samples.generation.json").read_text())
    assert stats["num_processes"] == 2
    results = json.loads((out / "iterate_results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1] and results["rounds"][1]["kl_to_initial"] != 0

    alone = tmp_path / "alone.jsonl"
    args = yaml.safe_load(recipe.read_text())
    generate(["--model_name_or_path", str(digits_model), "--dataset_name", str(out / "heldout_prompts.jsonl"),
              "--output", str(alone), "--num_completions", str(args["num_completions"]), "--max_new_tokens",
              str(args["max_new_tokens"]), "--seed", str(args["seed"])])
    assert alone.read_text() == (out / "round-0" / "eval" / "samples.jsonl").read_text()


def test_a_run_of_other_settings_is_refused_or_replaced_on_purpose(tmp_path):
    """`iterate.json` of other settings: refused naming the change and the two ways out, nothing touched; with
    `--overwrite_output_dir true` the old run's rounds, results and settings are removed, other files kept."""
    from nca_trl.iterate.layout import RunLayout
    from nca_trl.iterate.loop import _check_manifest

    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    _check_manifest(layout, {"seed": 0, "rounds": 2, "loss": "nca"})
    (layout.root / "round-1" / "model").mkdir(parents=True)
    layout.results.write_text("{}")
    (layout.root / "notes.txt").write_text("mine")
    (layout.root / "round-robin-notes.md").write_text("mine")  # named like a round; removed with the run's rounds
    (layout.root / "round-archive").mkdir()
    _check_manifest(layout, {"seed": 0, "rounds": 3, "loss": "nca"})  # more rounds: the same run, extended
    with pytest.raises(ValueError, match=r"holds an iterate run \(iterate.json\) with other settings \(loss: 'nca' -> "
                       r"'dpo'\).*`--overwrite_output_dir true`"):
        _check_manifest(layout, {"seed": 0, "rounds": 3, "loss": "dpo"})
    assert (layout.root / "round-1" / "model").is_dir() and layout.results.exists()
    _check_manifest(layout, {"seed": 0, "rounds": 3, "loss": "dpo"}, overwrite=True)
    assert not (layout.root / "round-1").exists() and not layout.results.exists()
    assert json.loads(layout.manifest.read_text())["loss"] == "dpo" and (layout.root / "notes.txt").exists()
    assert (layout.root / "round-robin-notes.md").exists() and (layout.root / "round-archive").is_dir()



def test_fewer_rounds_than_the_run_finished_are_refused(tmp_path):
    """`--rounds 1` on a finished 2-round run rewrote `iterate_results.json` with rounds 0 and 1 only and named round
    1's model the final policy, round 2 left behind unlisted. Now refused, naming the rounds; a round begun but not
    finished (no evaluation) may be left, and `--overwrite_output_dir true` starts the run anew."""
    from nca_trl.iterate.layout import RunLayout
    from nca_trl.iterate.loop import _check_manifest

    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    _check_manifest(layout, {"seed": 0, "rounds": 3})
    for r in (0, 1, 2):
        layout.mark_done(r, "eval", {"round": r, "empty_completions": 0})
    layout.mark_done(3, "generate", {})  # round 3 begun, not finished
    _check_manifest(layout, {"seed": 0, "rounds": 2})  # stopping before the unfinished round 3: allowed
    with pytest.raises(ValueError, match=r"other settings \(rounds: 2 finished -> 1\)"):
        _check_manifest(layout, {"seed": 0, "rounds": 1})
    assert layout.status(2)["eval"] and json.loads(layout.manifest.read_text())["rounds"] == 2
    _check_manifest(layout, {"seed": 0, "rounds": 1}, overwrite=True)
    assert not (layout.root / "round-2").exists() and json.loads(layout.manifest.read_text())["rounds"] == 1


def test_a_bad_prompt_is_named_in_the_users_file_before_anything_is_written(digits_model, tmp_path):
    """An empty prompt among the held-out ones failed at round 0's evaluation, named as row 7 of the run's own
    `heldout_prompts.jsonl`, after `iterate.json` was written: the fixed file was then refused as other settings
    (`prompts_sha256`). Now every prompt is checked first, named in the user's file."""
    from nca_trl.iterate import iterate
    from nca_trl.runtime.errors import DataError

    lines = SORT_PROMPTS.read_text().splitlines()[:40]
    lines[39] = json.dumps({**json.loads(lines[39]), "prompt": "  "})
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, digits_model, out, dataset_name=str(data))
    with pytest.raises(DataError, match=rf"{data}, row 39, field 'prompt': the prompt is empty"):
        iterate(["--config", str(recipe)])
    assert not out.exists()


def test_an_overwrite_stopped_mid_removal_is_finished_at_the_next_start(tmp_path):
    """A kill while `--overwrite_output_dir` removed the old run left some of its rounds and its `iterate.json`: a
    restart of the old settings took the rest for a run to continue (later rounds trained from a round that was
    gone). The removal's marker now makes the next start finish it first, whatever its settings."""
    from nca_trl.iterate.layout import RunLayout
    from nca_trl.iterate.loop import _check_manifest

    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    old = {"seed": 0, "rounds": 2, "loss": "nca"}
    _check_manifest(layout, old)
    (layout.root / "round-2" / "model").mkdir(parents=True)  # round 1 already removed when the run was stopped
    layout.removing.touch()
    (layout.root / "notes.txt").write_text("mine")
    _check_manifest(layout, old)  # the old settings, without --overwrite_output_dir
    assert not (layout.root / "round-2").exists() and not layout.removing.exists()
    assert json.loads(layout.manifest.read_text()) == old and (layout.root / "notes.txt").exists()


def test_a_restart_compares_the_run_not_its_spelling(tmp_path, monkeypatch):
    """`output_dir` spelled with a trailing slash (or a path setting spelled relative) was "other settings", and the
    suggested `--overwrite_output_dir true` deleted the finished run. And a `training:` setting refused mid-run (round
    1's `max_length`) left `iterate.json` behind, which refused the corrected command: while no round has trained,
    `training:` may change."""
    from nca_trl.iterate.layout import RunLayout
    from nca_trl.iterate.loop import _check_manifest

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text("{}\n")
    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    settings = {"seed": 0, "output_dir": str(layout.root), "dataset_name": "prompts.jsonl",
                "training": {"max_length": 5}}
    _check_manifest(layout, settings)
    _check_manifest(layout, {**settings, "output_dir": f"{layout.root}/", "dataset_name": str(tmp_path / "prompts.jsonl")})
    # No round trained: taken. Round 1's checkpoints of the earlier settings go (a resume continued them: a model
    # trained at the old learning rate, recorded as the new one); its samples stay
    (layout.root / "round-1" / "model" / "checkpoint-2").mkdir(parents=True)
    (layout.root / "round-1" / "rated.jsonl").write_text("{}\n")
    _check_manifest(layout, {**settings, "training": {"max_length": 32}})
    assert json.loads(layout.manifest.read_text())["training"] == {"max_length": 32}
    assert not (layout.root / "round-1" / "model").exists() and (layout.root / "round-1" / "rated.jsonl").exists()
    (layout.root / "round-1" / "status.json").write_text(json.dumps({"generate": {}, "score": {}, "train": {}}))
    with pytest.raises(ValueError, match=r"with other settings \(training: "):
        _check_manifest(layout, {**settings, "training": {"max_length": 64}})


def test_reward_sources_may_change_until_a_stage_that_scores_has_finished(tmp_path):
    """Round 0's evaluation failed on a reward function (None for every completion): nothing was scored, yet the
    corrected `reward_funcs` was refused as a run of other settings, which only `--overwrite_output_dir` got past."""
    from nca_trl.iterate.layout import RunLayout
    from nca_trl.iterate.loop import _check_manifest

    layout = RunLayout(tmp_path / "run")
    layout.root.mkdir()
    settings = {"seed": 0, "reward_funcs": ["rf:none_all"], "training": {"max_length": 5}}
    _check_manifest(layout, settings)
    (layout.root / "round-0").mkdir()  # the evaluation's samples may be there; its status lists nothing done
    _check_manifest(layout, {**settings, "reward_funcs": ["rf:length"], "training": {"max_length": 8}})
    assert json.loads(layout.manifest.read_text())["reward_funcs"] == ["rf:length"]
    layout.mark_done(0, "eval", {})
    with pytest.raises(ValueError, match=r"with other settings \(reward_funcs: "):
        _check_manifest(layout, {**settings, "reward_funcs": ["rf:other"], "training": {"max_length": 8}})
    _check_manifest(layout, {**settings, "reward_funcs": ["rf:length"], "training": {"max_length": 9}})  # not trained
    with pytest.raises(ValueError, match=r"with other settings \(seed: "):
        _check_manifest(layout, {**settings, "seed": 1, "reward_funcs": ["rf:length"], "training": {"max_length": 9}})

def test_a_restart_on_changed_prompts_is_refused(digits_model, tmp_path, monkeypatch):
    """The prompts file with its lines moved (the same name and number of prompts) was taken as the same run, and the
    later rounds' slices took held-out prompts as training prompts, exit 0. The run records their digest now."""
    from nca_trl.iterate import iterate, loop

    class Stop(Exception):
        pass

    monkeypatch.setattr(loop, "_round", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    lines = SORT_PROMPTS.read_text().splitlines(keepends=True)[:40]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(lines))
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, digits_model, out, dataset_name=str(prompts))
    with pytest.raises(Stop):  # iterate.json and the held-out prompts written, then stopped
        iterate(["--config", str(recipe)])
    with pytest.raises(Stop):
        iterate(["--config", str(recipe)])  # the same prompts: the same run
    prompts.write_text("".join(lines[:16] + lines[-8:] + lines[16:-8]))  # the held-out prompts moved into round 2's
    with pytest.raises(ValueError, match=r"holds an iterate run \(iterate.json\) with other settings \(prompts_sha256"):
        iterate(["--config", str(recipe)])


def test_a_training_max_length_no_prompt_fits_is_refused_at_the_start(digits_model, tmp_path):
    """`training: {max_length: 5}` with prompts of 7 tokens: refused at round 1's training, after round 0's evaluation
    and round 1's sampling and scoring had run. Now at the start, naming the round, before anything is written."""
    from nca_trl.iterate import iterate

    out = tmp_path / "run"
    recipe = _recipe(tmp_path, digits_model, out, training={"max_length": 5})
    with pytest.raises(ValueError, match=r"each training prompt of round 1 \(rows 0-15\) alone fills `max_length: 5` "
                       r"of the `training:` mapping \(shortest \d+ tokens, row \d+\).*Fix: raise `max_length` above "
                       r"\d+ in `training:`, or set `truncation_mode: keep_end` there\. Nothing was written\."):
        iterate(["--config", str(recipe)])
    assert not out.exists()
    # keep_end keeps every completion's tokens: not refused (stopped here before any round)
    from nca_trl.iterate import loop

    args = loop.parse_iterate_args(["--config", str(_recipe(tmp_path, digits_model, out, training={
        "max_length": 5, "truncation_mode": "keep_end"}))])
    loop._check_training_room(args, None, 16, None)  # returns before reading a prompt


def test_a_restart_on_a_changed_initial_model_or_reward_file_is_refused(digits_model, tmp_path, monkeypatch):
    """The initial model's folder overwritten (`make-tiny-model --overwrite`, a retrained SFT model under the same
    path) was taken as the same run: later rounds took another reference and initial model than the earlier ones',
    exit 0; likewise a reward function's file edited after rounds were scored with it. The run records what their
    files held (a copy of the same files is the same run; where nothing was scored yet, a reward file may change)."""
    import shutil

    from nca_trl.iterate import iterate, loop
    from nca_trl.tiny import build_tiny_model

    class Stop(Exception):
        pass

    monkeypatch.setattr(loop, "_round", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    model, out = tmp_path / "model", tmp_path / "run"
    shutil.copytree(digits_model, model)
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    recipe = _recipe(tmp_path, model, out, reward_funcs=[f"{rewards}:length"])
    with pytest.raises(Stop):
        iterate(["--config", str(recipe)])
    shutil.rmtree(model)
    shutil.copytree(digits_model, model)  # copied again: the same files
    (model / "README.md").write_text("a model card")  # not the model's weights or config: the same model
    with pytest.raises(Stop):
        iterate(["--config", str(recipe)])
    recorded = json.loads((out / "iterate.json").read_text())
    assert len(recorded["model_files_digest"]) == 16 and list(recorded["reward_funcs_files_digest"]) == [
        f"{rewards}:length"]

    rewards.write_text(rewards.read_text().replace("len(c)", "-len(c)"))
    with pytest.raises(Stop):  # nothing scored yet: taken
        iterate(["--config", str(recipe)])
    (out / "round-1").mkdir(exist_ok=True)
    (out / "round-1" / "status.json").write_text(json.dumps({"generate": {}, "score": {}}))
    rewards.write_text(rewards.read_text().replace("-len(c)", "2 * len(c)"))
    with pytest.raises(ValueError, match=r"with other settings \(reward_funcs_files_digest: "):
        iterate(["--config", str(recipe)])
    rewards.write_text(rewards.read_text().replace("2 * len(c)", "-len(c)"))

    build_tiny_model(model, seed=7, max_position_embeddings=64, vocab="digits", overwrite=True)
    with pytest.raises(ValueError, match=r"with other settings \(model_files_digest: '[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
        iterate(["--config", str(recipe)])

@pytest.mark.slow  # over a few seconds on 2 cores
def test_a_restart_keeps_the_split_and_counts_what_was_trained(digits_model, tmp_path):
    """Without `prompts_per_round` the split was computed from `rounds`, so `--rounds 2` on a finished 1-round run
    was refused as "prompts_per_round: 8 -> 4" (changing `rounds` is allowed); now the run's split is kept, and more
    rounds than its prompts allow are refused saying so. `train_prompts` counted the prompts training dropped for
    filling `max_length` (3 here) as trained."""
    from nca_trl.iterate import iterate

    rows = [json.loads(line) for line in SORT_PROMPTS.read_text().splitlines()[:12]]
    for row in rows[:3]:
        row["prompt"] = "1234567890123>"  # fills max_length 14 alone
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    recipe = _recipe(tmp_path, digits_model, out, rounds=1, prompts_per_round=None, heldout_prompts=4,
                     dataset_name=str(data), num_completions=2, training={"max_length": 14, "ties": "keep"})
    results = iterate(["--config", str(recipe)])
    info = json.loads((out / "round-1" / "model" / "run_info.json").read_text())
    rated = (out / "round-1" / "rated.jsonl").read_text().splitlines()
    trained = info["train_metrics"]["train_samples"]
    assert info["dropped"]["train"]["too_long_dropped"] == 3 and trained == len(rated) - 3
    assert results["rounds"][1]["train_prompts"] == trained
    with pytest.raises(ValueError, match=r"2 rounds x 8 prompts need 16 training prompts"):
        iterate(["--config", str(recipe), "--rounds", "2"])
    assert iterate(["--config", str(recipe), "--output_dir", f"{out}/"])["rounds"][1]["train_prompts"] == trained

@pytest.mark.parametrize("override, message", [
    ({"temperature": -1}, "`temperature` must be > 0"),
    ({"reward_funcs": ["nca_trl.scoring.functions:sorted_digitz"]}, "has no attribute 'sorted_digitz' \\(did you mean "
                                                                     "sorted_digits"),
    ({"training": {"warmup_stepz": 0}}, "'warmup_stepz' \\(did you mean 'warmup_steps'"),
    ({"reward_model": "outputs/no-such-rm"}, "no such file or folder: outputs/no-such-rm \\(reward_model\\)"),
], ids=["temperature", "reward function", "training key", "reward model path"])
def test_a_bad_setting_fails_before_anything_is_written(digits_model, tmp_path, monkeypatch, override, message):
    """Before: a misspelled reward function (and a bad `reward_model` path) failed when the score stage ran, after
    `iterate.json`, the held-out prompts and round 0's evaluation were written, and the corrected rerun was refused
    as "a run with other settings". Now every stage's settings are checked first: nothing is written, and the
    corrected command just runs (checked here up to its parse; the full runs are the slow tests above)."""
    from nca_trl.iterate import iterate, parse_iterate_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        iterate(["--config", str(_recipe(tmp_path, digits_model, out, **override))])
    assert not out.exists()
    assert parse_iterate_args(["--config", str(_recipe(tmp_path, digits_model, out))]).stages is not None


def test_dpo_rounds_mark_their_checkpoints_and_resume_from_a_complete_one(digits_model, tmp_path, capsys):
    """Before: `loss: dpo` resumed with transformers' `get_last_checkpoint`, so a checkpoint killed while it was
    written (no marker) was picked. Now trl.DPOTrainer in `iterate` marks complete checkpoints as our trainers do,
    and a resume skips an incomplete one, naming it."""
    import shutil

    from trl import DPOConfig

    from nca_trl.iterate.stages import _train_dpo

    rated = tmp_path / "rated.jsonl"
    rows = [{"prompt": f"{p}>", "completions": ["".join(sorted(p)), p[::-1]], "rewards": [1.0, 0.2]}
            for p in ("31415", "27182", "16180", "14142")]
    rated.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "model"

    def config(steps):
        return DPOConfig(output_dir=str(out), max_steps=steps, save_strategy="steps", save_steps=1, bf16=False,
                         use_cpu=True, per_device_train_batch_size=2, report_to="none", disable_tqdm=True,
                         gradient_checkpointing=False, learning_rate=1e-3)

    _train_dpo(str(digits_model), None, rated, out, config(2))
    assert all((out / f"checkpoint-{n}" / "nca_trl_complete.json").exists() for n in (1, 2))
    (out / "checkpoint-2" / "nca_trl_complete.json").unlink()  # as if killed while checkpoint-2 was written
    shutil.rmtree(out / "checkpoint-2" / "optimizer.pt", ignore_errors=True)
    capsys.readouterr()
    _train_dpo(str(digits_model), None, rated, out, config(3))
    assert f"resuming from {out / 'checkpoint-1'}\n" in capsys.readouterr().out
    assert all((out / f"checkpoint-{n}" / "nca_trl_complete.json").exists() for n in (2, 3))  # written again, whole


@pytest.mark.slow  # over a few seconds on 2 cores
def test_train_continues_a_lora_adapter_against_either_reference(tiny_mistral, tmp_path):
    """`nca-trl train --use_peft` on an adapter folder (a LoRA run's output, as `iterate` passes the previous round's)
    trains that adapter further on its base instead of a fresh one; the reference is the adapter as loaded (TRL's
    frozen copy: `reference: previous`), or the base with the adapter disabled when `ref_model_name_or_path` names
    the base (`reference: initial`), with no second model."""
    from safetensors.torch import load_file

    from nca_trl.train import train

    lora = {"use_peft": "true", "lora_r": "4", "lora_alpha": "8", "lora_target_modules": "all-linear"}
    first = train(_train_argv(tiny_mistral, tmp_path / "r1", **lora, learning_rate="0.01", max_steps="2")[1:])
    adapter = tmp_path / "r1" / "adapter_model.safetensors"
    assert adapter.exists() and not (tmp_path / "r1" / "model.safetensors").exists() and first["global_step"] == 2
    before = load_file(adapter)

    # learning rate 0: the adapter comes out as it went in (a fresh adapter would be another, random one)
    previous = train(_train_argv(tmp_path / "r1", tmp_path / "r2", **lora, learning_rate="0")[1:])
    after = load_file(tmp_path / "r2" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the reference is the adapter as loaded: at the first step policy = reference, every implicit reward 0
    assert previous["log_history"][0]["rewards/margins"] == 0.0

    initial = train(_train_argv(tmp_path / "r1", tmp_path / "r3", **lora, learning_rate="0",
                                ref_model_name_or_path=str(tiny_mistral))[1:])
    margins = initial["log_history"][0]["rewards/margins"]
    assert margins != 0.0  # the base differs from the trained adapter

    # Precomputed, the same references. The base reference was precomputed from TRL's frozen copy of the adapter (the
    # choice was made after the constructor, which precomputes): margins 0, as `previous`. The two share the cache's
    # model hash (the same adapters are loaded), so the choice is part of the cache key: in this order `previous`
    # reused `initial`'s cache
    precompute = {**lora, "learning_rate": "0", "precompute_ref_log_probs": "true"}
    initial = train(_train_argv(tmp_path / "r1", tmp_path / "r4", **precompute,
                                ref_model_name_or_path=str(tiny_mistral))[1:])
    assert initial["log_history"][0]["rewards/margins"] == pytest.approx(margins, rel=1e-5)
    previous = train(_train_argv(tmp_path / "r1", tmp_path / "r5", **precompute)[1:])
    assert previous["log_history"][0]["rewards/margins"] == 0.0



@pytest.mark.slow
def test_lora_rounds_resume_after_a_kill_with_the_same_adapter(digits_model, tmp_path):
    """`training.use_peft`: each round trains one adapter carried from the previous round, saves the adapter only,
    samples and evaluates from it. A run killed (SIGKILL) during round 2's training, once a checkpoint is complete,
    resumes with the same command and ends with exactly the adapter weights of an uninterrupted run."""
    from safetensors.torch import load_file

    training = {"save_strategy": "steps", "save_steps": 1, "ties": "drop"}
    whole = tmp_path / "whole"
    proc = _iterate_process(_recipe(tmp_path, digits_model, whole, "iterate_nca_lora.yaml", training=training), whole)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    for r in (1, 2):
        model = whole / f"round-{r}" / "model"
        assert (model / "adapter_model.safetensors").exists() and not (model / "model.safetensors").exists()
    assert f"--model_name_or_path {whole / 'round-1' / 'model'}" in log  # round 2 samples from round 1's adapter
    train2 = yaml.safe_load((whole / "round-2" / "train.yaml").read_text())
    assert train2["model_name_or_path"] == str(whole / "round-1" / "model") and train2["use_peft"]
    results = json.loads((whole / "iterate_results.json").read_text())["rounds"]
    assert results[0]["kl_to_initial"] == 0 and results[2]["kl_to_initial"] != 0
    # `ties: drop`: each round's prompts whose K rewards all tie are left out and counted
    for r in (1, 2):
        rated = [json.loads(line) for line in (whole / f"round-{r}" / "rated.jsonl").read_text().splitlines()]
        tied = sum(max(row["rewards"]) == min(row["rewards"]) for row in rated)
        assert _status(whole, r)["train"]["ties_dropped"] == tied == results[r]["ties_dropped"]
        assert _status(whole, r)["train"]["train_prompts"] == len(rated) - tied

    out = tmp_path / "killed"
    recipe = _recipe(tmp_path, digits_model, out, "iterate_nca_lora.yaml", training=training)
    _kill_in_round_two_training(recipe, out)
    assert set(_status(out, 2)) == {"generate", "score"}, "the kill came after round 2's training had finished"
    proc = _iterate_process(recipe, out)
    log2 = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0 and "--resume_from_checkpoint true" in log2, log2[-3000:]
    for r in (1, 2):
        a = load_file(whole / f"round-{r}" / "model" / "adapter_model.safetensors")
        b = load_file(out / f"round-{r}" / "model" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"round {r}"


def test_the_other_processes_wait_for_the_main_process_by_its_marks(tmp_path, monkeypatch):
    """Scoring and the evaluation's numbers run on the main process alone. The other processes waited for them in a
    barrier, a collective that times out (NCCL's and DeepSpeed's default: 10 minutes) while a reward model scores for
    longer; they now wait for the main process's mark in status.json and meet it in a barrier only then. Here a second
    process's round 1, the main process's marks written by a thread after a delay."""
    import threading
    from types import SimpleNamespace

    import nca_trl.runtime.environment as environment
    from nca_trl.iterate import loop
    from nca_trl.iterate.layout import RunLayout

    layout = RunLayout(tmp_path / "run")
    layout.round_dir(1).mkdir(parents=True)
    barriers = []
    state = SimpleNamespace(is_main_process=False, num_processes=2,
                            wait_for_everyone=lambda: barriers.append(sorted(layout.status(1))))
    monkeypatch.setattr(environment, "broadcast", lambda state, value: {})  # round 1's status.json: nothing done
    monkeypatch.setattr(loop, "run_generate", lambda *args, **kwargs: {"stats": {}})
    monkeypatch.setattr(loop, "run_train", lambda *args, **kwargs: {})
    monkeypatch.setattr(loop, "_evaluate", lambda *args: {})
    monkeypatch.setattr(loop, "_POLL_S", 0.02)

    def main_process():
        for stage, info in (("generate", {}), ("score", {}), ("train", {}), ("eval", {"empty_completions": 0})):
            time.sleep(0.3)
            layout.mark_done(1, stage, info)

    thread = threading.Thread(target=main_process)
    thread.start()
    args = SimpleNamespace(model_name_or_path="m", seed=0, reference="initial")
    loop._round(args, layout, 1, 8, None, state)
    thread.join()
    # Barriers: the round's prompts written, scoring, training (which every process runs), the evaluation
    assert len(barriers) == 4 and "score" in barriers[1] and "eval" in barriers[3], barriers


@pytest.mark.slow
def test_the_dpo_baseline_resumed_at_its_last_step_trains_no_further_step(tiny_mistral, tmp_path):
    """`loss: dpo` rounds run `trl.DPOTrainer` (marked checkpoints): resumed from a checkpoint at max_steps it trained
    a step past it (transformers skips global_step batches, then trains the next), as our trainers did, and its
    train_loss was 0.0 (the steps of the resumed call)."""
    from datasets import Dataset
    from test_trainer import make_args
    from trl import DPOConfig

    from nca_trl.iterate.stages import marked_dpo_trainer

    rows = [{"prompt": r["prompt"], "chosen": r["completions"][0], "rejected": r["completions"][1]}
            for r in (json.loads(line) for line in VICUNA.read_text().splitlines()[:8])]
    trainer_cls = marked_dpo_trainer()

    def trainer_in(name):
        args = make_args(DPOConfig, tmp_path, max_steps=2, max_length=64, save_strategy="steps", save_steps=1)
        args.output_dir = str(tmp_path / name)
        return trainer_cls(model=tiny_mistral, args=args, train_dataset=Dataset.from_list(rows))

    whole = trainer_in("whole")
    result = whole.train()
    resumed = trainer_in("whole")  # its checkpoint-2, as a kill before the round's final save leaves it
    again = resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert again.global_step == 2  # and its train_loss (the round's status) the run's, not 0.0
    assert again.metrics["train_loss"] == pytest.approx(result.metrics["train_loss"], rel=1e-6)
    trained = dict(whole.model.named_parameters())
    assert all(torch.equal(value, trained[name]) for name, value in resumed.model.named_parameters())


def test_the_dpo_baseline_stops_at_a_non_finite_loss(tiny_mistral, hh, tmp_path):
    """`loss: dpo` trained on through NaN losses (learning rate 1e30) and saved a model of NaN weights, marked
    trained; the evaluation then failed on a NaN KL at every rerun. It now stops as our trainers do."""
    from trl import DPOConfig

    from nca_trl.iterate.stages import marked_dpo_trainer
    from nca_trl.runtime.safety import NonFiniteError

    args = DPOConfig(output_dir=str(tmp_path / "dpo"), learning_rate=1e30, max_steps=4, per_device_train_batch_size=2,
                     max_length=64, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
                     lr_scheduler_type="constant", logging_steps=1)
    trainer = marked_dpo_trainer()(model=tiny_mistral, args=args, train_dataset=hh.select(range(8)))
    with pytest.raises(NonFiniteError, match=r"Non-finite (training loss|gradient norm) .* at step [2-4].*rows "
                       r"unknown \(its batches do not name them\)"):  # not our collator's advice
        trainer.train()
