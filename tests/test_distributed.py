"""Distributed training proven under the real `accelerate launch` on CPU (2 processes, gloo).

Each launch writes run_info.json (and, through tests/launch_probe.py, probe.json: pids, leaf counts, checksums) from
inside the run; every test asserts world size 2 and the distributed type from
it, because a broken launch can look green: a MULTI_CPU accelerate config silently starts one process, and MULTI_GPU
without `use_cpu` starts two independent single-process trainings. Launches share one DeepSpeed extension cache
(TORCH_EXTENSIONS_DIR, or a temporary folder) and each gets its own free port; a timeout fails the test (a hang is a
failure). The launch helpers are in tests/launching.py, the environment in the `launch_env` fixture (conftest.py).
Budget: 6 launches of a tiny model for 4 steps of 8 prompts x 4 completions x 64 tokens; the two-machine ZeRO-3 run
also evaluates 2 + 2 prompts at the start and the end (the others do not: evaluation takes about a third of a
launch's time and leaves the step losses as they are).
"""

import math
from pathlib import Path

import pytest
import torch

from launching import (
    ACCEL,
    DDP_CPU_ARGS,
    assert_two_processes,
    common_args,
    cpu_config,
    free_port,
    launch,
    launch_cmd,
    losses,
    read_run,
    start,
    wait,
)
from nca_trl.train import train as train_main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------------------------------- runs (shared)
@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def single_b1(tiny_mistral, runs_dir):
    """Nothing distributed: one process, 1 prompt per step (what a silently single-process launch would do)."""
    return train_main(common_args(tiny_mistral) + ["--use_cpu", "true", "--output_dir", str(runs_dir / "single_b1")])


@pytest.fixture(scope="module")
def single_b2(tiny_mistral, runs_dir):
    """One process with the global batch of two processes x 1 prompt: the losses distributed runs must reproduce."""
    return train_main(
        common_args(tiny_mistral)
        + ["--use_cpu", "true", "--per_device_train_batch_size", "2", "--output_dir", str(runs_dir / "single_b2")]
    )


@pytest.fixture(scope="module")
def ddp(tiny_mistral, runs_dir, launch_env):
    # CPU DDP: the shipped ddp.yaml (MULTI_GPU) with use_cpu: true; accelerate then reports MULTI_CPU
    config = cpu_config(runs_dir / "ddp_cpu.yaml")
    return launch(launch_env, config, common_args(tiny_mistral) + list(DDP_CPU_ARGS), runs_dir / "ddp")


@pytest.fixture(scope="module")
def zero2(tiny_mistral, runs_dir, launch_env):
    """Its own DeepSpeed extension cache, which the run leaves without DeepSpeed's inference-only shm kernel, and no C++
    compiler (`CXX` names none): DeepSpeed's CPU backend failed to start without one ("Error building extension
    'deepspeed_shm_comm'") before nca-trl left that kernel unbuilt."""
    args = common_args(tiny_mistral) + ["--ddp_backend", "gloo"]
    extensions = runs_dir / "zero2_extensions"
    env = {**launch_env, "TORCH_EXTENSIONS_DIR": str(extensions), "CXX": str(runs_dir / "no-such-compiler")}
    info = launch(env, ACCEL / "deepspeed_zero2.yaml", args, runs_dir / "zero2")
    info["extensions_built"] = sorted(p.name for p in extensions.glob("*/*")) if extensions.exists() else []
    return info


@pytest.fixture(scope="module")
def zero3(tiny_mistral, runs_dir, launch_env):
    """ZeRO-3, checkpoint every 2 steps, final weights' checksums gathered across the shards."""
    args = common_args(tiny_mistral) + [
        "--ddp_backend", "gloo", "--save_strategy", "steps", "--save_steps", "2", "--probe_checksums",
    ]
    return launch(launch_env, ACCEL / "deepspeed_zero3.yaml", args, runs_dir / "zero3")


# --------------------------------------------------------------------------------------------------- tests
@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_cpu_processes(ddp):
    assert_two_processes(ddp, "MULTI_CPU")


@pytest.mark.slow
@pytest.mark.distributed
def test_zero2_two_processes(zero2):
    assert_two_processes(zero2, "DEEPSPEED", zero_stage=2)
    assert zero2["extensions_built"] == []  # no C++ compiled at the start (environment.skip_deepspeed_cpu_shm_build)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_processes(zero3):
    assert_two_processes(zero3, "DEEPSPEED", zero_stage=3)
    assert zero3["z3_leaf_modules"]["policy"] == 0  # a dense model has no MoE block to mark
    assert zero3["z3_leaf_modules"]["marked_by_nca_trl"] == [0, 0]  # but both ZeRO-3 engines went through the guard


@pytest.mark.slow
@pytest.mark.distributed
def test_step_losses_agree_across_ddp_zero2_zero3(ddp, zero2, zero3, single_b1, single_b2):
    reference = losses(single_b2)
    assert len(reference) == 4
    for name, info in (("ddp", ddp), ("zero2", zero2), ("zero3", zero3)):
        assert losses(info) == pytest.approx(reference, rel=1e-4, abs=1e-5), name
    # Step 1 is the same constant everywhere (implicit reference: every log-ratio is 0); from step 2 on the
    # distributed runs must differ from a run where nothing was distributed
    assert losses(single_b1)[0] == pytest.approx(2 * math.log(2), abs=1e-6)
    for a, b in zip(losses(zero3)[1:], losses(single_b1)[1:]):
        assert abs(a - b) > 1e-4
    assert any(abs(a - reference[0]) > 1e-3 for a in reference[1:])


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_checkpoint_loads_and_equals_gathered_weights(zero3, tiny_mistral):
    from transformers import AutoModelForCausalLM

    out = Path(zero3["output_dir"])
    assert (out / "model.safetensors").exists() and (out / "checkpoint-2" / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    params = dict(model.named_parameters())
    sums = zero3["param_checksums"]
    assert set(sums) == set(params)
    for name, (total, squares, shape) in sums.items():
        t = params[name].detach().double()
        assert list(t.shape) == shape
        assert t.sum().item() == pytest.approx(total, rel=1e-9, abs=1e-9), name
        assert (t * t).sum().item() == pytest.approx(squares, rel=1e-9), name
    initial = AutoModelForCausalLM.from_pretrained(tiny_mistral, dtype=torch.float32)
    assert not torch.equal(initial.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_resume_reproduces_later_losses(zero3, tiny_mistral, runs_dir, launch_env):
    checkpoint = Path(zero3["output_dir"]) / "checkpoint-2"
    args = common_args(tiny_mistral) + ["--ddp_backend", "gloo", "--resume_from_checkpoint", str(checkpoint)]
    resumed = launch(launch_env, ACCEL / "deepspeed_zero3.yaml", args, runs_dir / "zero3_resumed")
    assert_two_processes(resumed, "DEEPSPEED", zero_stage=3)
    assert resumed["start_step"] == 2 and resumed["steps_logged_this_run"] == [3, 4]
    assert losses(resumed)[2:] == pytest.approx(losses(zero3)[2:], rel=1e-5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_tiny_mixtral_zero3_moe_blocks_are_leaves(tiny_mixtral, runs_dir, launch_env):
    """Mixtral under ZeRO-3 finishes (the timeout fails a hang) with its MoE blocks as ZeRO-3 leaves in the policy and
    in the reference model, and the router aux loss in the loss."""
    args = common_args(tiny_mixtral, "nca_mixtral.yaml") + ["--ddp_backend", "gloo"]
    info = launch(launch_env, ACCEL / "deepspeed_zero3.yaml", args, runs_dir / "mixtral_zero3")
    assert_two_processes(info, "DEEPSPEED", zero_stage=3)
    leaf = info["z3_leaf_modules"]
    assert leaf["policy"] == 2 and leaf["reference"] == 2  # 2 layers, each with one MixtralSparseMoeBlock
    assert leaf["marked_by_nca_trl"] == [2, 2]  # the reference engine (trainer __init__), then the policy (train)
    logged = [e for e in info["log_history"] if "loss" in e]
    assert all(e["aux_loss"] > 0 for e in logged) and all(math.isfinite(e["loss"]) for e in logged)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_machines_on_localhost_infonca_precomputed_reference(tiny_mistral, runs_dir, launch_env):
    """Two `accelerate launch` commands, --num_machines 2, machine rank 0 / 1, one process each, same master address
    and port, InfoNCA with precomputed reference log-probs under ZeRO-3: one world of size 2 whose losses equal a
    single process's with the live reference on the same global batch. The one launch that evaluates (ZeRO-3, and the
    evaluation sets' reference log-probs precomputed too)."""
    out = runs_dir / "two_machines"
    out.mkdir()
    port = free_port()
    train_args = common_args(tiny_mistral, "infonca.yaml", evaluate=True) + [
        "--ddp_backend", "gloo", "--precompute_ref_log_probs", "true", "--output_dir", str(out),
    ]
    procs, logs = [], []
    for rank in (0, 1):
        log = runs_dir / f"two_machines_rank{rank}.log"
        logs.append(log)
        extra = ("--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1")
        procs.append(start(launch_cmd(ACCEL / "deepspeed_zero3.yaml", port, extra) + train_args, log, launch_env))
    wait(procs, logs)
    info = read_run(out)
    assert_two_processes(info, "DEEPSPEED", zero_stage=3)
    assert info["num_machines"] == 2 and [p["local_process_index"] for p in info["processes"]] == [0, 0]
    assert info["trainer"] == "InfoNCATrainer" and info["z3_leaf_modules"]["reference"] is None  # no live reference
    assert losses(info)[0] == pytest.approx(math.log(4), abs=1e-6)
    # Both evaluation sets ran at the start, against their own precomputed reference log-probs (the policy's then),
    # and at the end
    at_start = {k: v for e in info["log_history"] if e["step"] == 0 for k, v in e.items() if k.endswith("_loss")}
    assert sorted(at_start) == ["eval_heldout_loss", "eval_train_prompts_loss"]
    assert all(v == pytest.approx(math.log(4), abs=1e-6) for v in at_start.values())
    assert {"eval_heldout_loss", "eval_train_prompts_loss"} <= set(info["eval_metrics"])

    live = train_main(
        common_args(tiny_mistral, "infonca.yaml")
        + ["--use_cpu", "true", "--per_device_train_batch_size", "2", "--output_dir", str(runs_dir / "infonca_b2")]
    )
    assert losses(info) == pytest.approx(losses(live), rel=1e-4, abs=1e-5)
    assert any(abs(a - losses(live)[0]) > 1e-3 for a in losses(live)[1:])


# --------------------------------------------------------------------------------------------------- helpers (no launch)
def test_moe_leaf_marking_and_initialize_guard(tiny_mixtral, tiny_mistral, monkeypatch):
    import deepspeed
    from transformers import AutoModelForCausalLM

    from nca_trl.runtime.distributed import (
        count_z3_leaf_modules,
        find_moe_block_classes,
        mark_moe_leaf_modules,
        zero3_moe_leaf_guard,
    )

    mixtral = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    mistral = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    assert [c.__name__ for c in find_moe_block_classes(mixtral)] == ["MixtralSparseMoeBlock"]
    assert find_moe_block_classes(mistral) == [] and mark_moe_leaf_modules(mistral) == 0
    with pytest.raises(ValueError, match="NoSuchBlock"):
        find_moe_block_classes(mixtral, ["NoSuchBlock"])

    seen = []

    def fake_initialize(args=None, model=None, config=None, **kwargs):
        seen.append(count_z3_leaf_modules(model))
        return model

    monkeypatch.setattr(deepspeed, "initialize", fake_initialize)
    with zero3_moe_leaf_guard() as marked:
        deepspeed.initialize(model=mixtral, config={"zero_optimization": {"stage": 2}})  # not ZeRO-3: untouched
        deepspeed.initialize(model=mixtral, config={"zero_optimization": {"stage": 3}})
        deepspeed.initialize(model=mistral, config_params={"zero_optimization": {"stage": 3}})
    assert seen == [0, 2, 0] and marked == [2, 0]
    assert deepspeed.initialize is fake_initialize  # restored


def launch_on_rows(script: str, model, rows: list[dict], out: Path, env: dict) -> None:
    """`accelerate launch` of the tests' `script` on 2 CPU processes with its arguments MODEL ROWS.json OUT_DIR:
    `rows` written to `out/rows.json`, what the script writes in `out`."""
    import json

    (out / "rows.json").write_text(json.dumps(rows))
    cmd = launch_cmd(cpu_config(out / "ddp.yaml"), free_port(), ("--num_processes", "2"),
                     (str(Path(__file__).resolve().parent / script), str(model), str(out / "rows.json"), str(out)))
    log = out / "launch.log"
    wait([start(cmd, log, env)], [log])


@pytest.mark.slow
@pytest.mark.distributed
def test_precomputed_reference_of_an_in_memory_dataset_on_two_processes(tiny_mistral, tmp_path, launch_env):
    """A `Dataset.from_list` has no cache files: each process named its own temporary cache file, which only the main
    process wrote, so the other one failed (FileNotFoundError). Every process now holds the same reference log-probs,
    those of one process."""
    import json

    from datasets import Dataset
    from launching import VICUNA

    from nca_trl import NCAConfig, NCATrainer

    rows = [{k: row[k] for k in ("prompt", "completions", "rewards")}
            for row in map(json.loads, VICUNA.read_text().splitlines()[:4])]
    launch_on_rows("in_memory_precompute_run.py", tiny_mistral, rows, tmp_path, launch_env)
    ranks = [json.loads((tmp_path / f"ref_logps-{rank}.json").read_text()) for rank in (0, 1)]
    args = NCAConfig(output_dir=str(tmp_path / "single"), max_length=64, precompute_ref_log_probs=True,
                     report_to="none", use_cpu=True, activation_checkpointing=False, bf16=False)
    single = NCATrainer(model=str(tiny_mistral), args=args, train_dataset=Dataset.from_list(rows))
    assert ranks[0] == ranks[1] and len(ranks[0]) == 4
    assert torch.allclose(torch.tensor(ranks[0]), torch.tensor([row["ref_logps"] for row in single.train_dataset]), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_compute_metrics_on_two_processes_gets_each_completion_once(tiny_mistral, tmp_path, launch_env):
    """Prompts of K = 2, 4, 3, 4, 2: the batches' rows of completions differ in number between the processes, which gloo
    could not gather ("Received data size doesn't match expected size": the process aborted); and 5 prompts on 2
    processes pad the last batch with duplicates. `compute_metrics` now gets each of the 15 completions once, with the
    logits and in the order of one process with the same global batch (2 processes x 1 prompt = 1 process x 2). In
    batches of 2 prompts per process, a last batch's real completions come interleaved with a duplicate's: cutting
    the gathered rows to their count kept a duplicate's completion and lost a real one. A stream (no length) keeps
    its padding duplicate (its first prompt), as accelerate does for any Trainer, in its batch's slot-major order."""
    import json

    from datasets import Dataset
    from launching import VICUNA

    from nca_trl import NCAConfig, NCATrainer

    rows = [json.loads(line) for line in VICUNA.read_text().splitlines()[:5]]
    rows = [{"prompt": row["prompt"], "completions": [c[: 30 + 45 * i] for i, c in enumerate(row["completions"][:k])],
             "rewards": row["rewards"][:k]} for row, k in zip(rows, (2, 4, 3, 4, 2))]
    launch_on_rows("compute_metrics_run.py", tiny_mistral, rows, tmp_path, launch_env)
    seen = json.loads((tmp_path / "seen.json").read_text())

    import compute_metrics_run

    data = Dataset.from_list(rows)
    single = {}
    for batch in (2, 4):  # the global batches of 2 processes x 1 and x 2
        args = NCAConfig(output_dir=str(tmp_path / "single"), max_length=256, per_device_eval_batch_size=batch,
                         report_to="none", use_cpu=True, activation_checkpointing=False, bf16=False)
        trainer = NCATrainer(model=str(tiny_mistral), args=args, train_dataset=data, eval_dataset=data,
                             compute_metrics=compute_metrics_run.metrics_for(str(tiny_mistral)))
        single[batch] = {"metrics": trainer.evaluate(), **compute_metrics_run.SEEN}
        assert single[batch]["metrics"]["eval_rows"] == 15
    assert len({len(tokens) for tokens in single[2]["labels"]}) > 5  # the rows tell apart
    assert single[2]["labels"] != single[4]["labels"]  # the global batch decides the order
    for name, batch in (("dataset", 2), ("batches_of_2", 4)):
        launched, one = seen[name], single[batch]
        assert launched["metrics"]["eval_rows"] == 15 and launched["labels"] == one["labels"], name
        assert launched["logits"] == pytest.approx(one["logits"], rel=1e-4), name
        assert launched["metrics"]["eval_loss"] == pytest.approx(one["metrics"]["eval_loss"], rel=1e-5), name
    # The stream's last global batch is [prompt 4, prompt 0 again]: slot-major, prompt 0's rows are the first
    # batch's rows 0 and 2 (that batch is [prompt 0, prompt 1])
    order = [*range(13), 13, 0, 14, 2]
    streamed = seen["streamed"]
    assert streamed["labels"] == [single[2]["labels"][i] for i in order]
    assert streamed["logits"] == pytest.approx([single[2]["logits"][i] for i in order], rel=1e-4)
