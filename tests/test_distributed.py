"""Distributed training proven under the real `accelerate launch` on CPU (2 processes, gloo).

Each launch writes run_info.json (and, through tests/launch_probe.py, probe.json: pids, leaf counts, checksums) from
inside the run; every test asserts world size 2 and the distributed type from
it, because a broken launch can look green: a MULTI_CPU accelerate config silently starts one process, and MULTI_GPU
without `use_cpu` starts two independent single-process trainings. Launches share one DeepSpeed extension cache
(TORCH_EXTENSIONS_DIR, or a temporary folder) and each gets its own free port; a timeout fails the test (a hang is a
failure). Budget: 6 launches of a tiny model for 4 steps of 8 prompts x 4 completions x 64 tokens.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nca_trl.cli import train as train_main

REPO = Path(__file__).resolve().parents[1]
VICUNA = REPO / "data" / "vicuna_rated.jsonl"
ACCEL = REPO / "recipes" / "accelerate_configs"
TRAIN = Path(__file__).resolve().parent / "launch_probe.py"
LAUNCH_TIMEOUT = 300  # seconds; first DeepSpeed launch compiles a small C++ op (~35 s)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def common_args(model: str, recipe: str = "nca.yaml") -> list[str]:
    """Tiny, fast, and with a learning rate large enough that the step losses move apart from step 2 on."""
    return [
        "--config", str(REPO / "recipes" / "tiny" / recipe),
        "--model_name_or_path", str(model),
        "--dataset_name", str(VICUNA),
        "--bf16", "false",
        "--max_length", "64",
        "--max_train_samples", "8",
        "--max_steps", "4",
        "--per_device_train_batch_size", "1",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--logging_steps", "1",
        "--warmup_steps", "0",
        "--lr_scheduler_type", "constant",
        "--beta", "0.1",
        "--learning_rate", "5e-3",
        "--report_to", "none",
        "--seed", "42",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launch_env(tmp_path_factory):
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.getbasetemp() / "torch_extensions"))
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    return env


def _launch_cmd(config, port, extra_launch=()):
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(port), "--mixed_precision", "no", *extra_launch, str(TRAIN),
    ]


def _wait(procs, logs, timeout):
    """Wait for all processes; on timeout kill their process groups (only the ones started here) and fail."""
    deadline = time.time() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pytest.fail(f"launch timed out after {timeout}s (hang?)\n" + "\n".join(_tail(log) for log in logs))
    for proc, log in zip(procs, logs):
        if proc.returncode != 0:
            pytest.fail(f"launch failed with exit code {proc.returncode}\n{_tail(log)}")


def _tail(log: Path, n: int = 60) -> str:
    lines = log.read_text(errors="replace").splitlines()
    keep = [line for line in lines if "Warning" not in line and "warnings.warn" not in line]
    return f"--- {log} ---\n" + "\n".join(keep[-n:])


def launch(env, config, train_args, out: Path, extra_launch=()) -> dict:
    """`accelerate launch` 2 processes of `nca-trl train` (with the test probe); returns run_info.json and probe.json,
    both written inside the run."""
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            _launch_cmd(config, free_port(), ("--num_processes", "2", *extra_launch))
            + [*train_args, "--output_dir", str(out)],
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
        )
        _wait([proc], [log], LAUNCH_TIMEOUT)
    return read_run(out)


def read_run(out: Path) -> dict:
    return {**json.loads((out / "run_info.json").read_text()), **json.loads((out / "probe.json").read_text())}


def losses(info: dict) -> list[float]:
    return [s["loss"] for s in info["step_losses"]]


def assert_two_processes(info: dict, distributed_type: str, zero_stage=None):
    assert info["world_size"] == 2 and info["num_processes"] == 2
    assert info["distributed_type"] == distributed_type and info["zero_stage"] == zero_stage
    assert info["backend"] == "gloo"
    assert sorted(p["process_index"] for p in info["processes"]) == [0, 1]
    assert len({p["pid"] for p in info["processes"]}) == 2
    assert info["global_step"] == 4


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
    accel = yaml.safe_load((ACCEL / "ddp.yaml").read_text())
    accel["use_cpu"] = True
    config = runs_dir / "ddp_cpu.yaml"
    config.write_text(yaml.safe_dump(accel))
    args = common_args(tiny_mistral) + ["--use_cpu", "true", "--ddp_backend", "gloo"]
    return launch(launch_env, config, args, runs_dir / "ddp")


@pytest.fixture(scope="module")
def zero2(tiny_mistral, runs_dir, launch_env):
    args = common_args(tiny_mistral) + ["--ddp_backend", "gloo"]
    return launch(launch_env, ACCEL / "deepspeed_zero2.yaml", args, runs_dir / "zero2")


@pytest.fixture(scope="module")
def zero3(tiny_mistral, runs_dir, launch_env):
    """ZeRO-3, checkpoint every 2 steps, final weights' checksums gathered across the shards."""
    args = common_args(tiny_mistral) + [
        "--ddp_backend", "gloo", "--save_strategy", "steps", "--save_steps", "2", "--probe_checksums",
    ]
    return launch(launch_env, ACCEL / "deepspeed_zero3.yaml", args, runs_dir / "zero3")


# --------------------------------------------------------------------------------------------------- tests
def test_ddp_two_cpu_processes(ddp):
    assert_two_processes(ddp, "MULTI_CPU")


def test_zero2_two_processes(zero2):
    assert_two_processes(zero2, "DEEPSPEED", zero_stage=2)


def test_zero3_two_processes(zero3):
    assert_two_processes(zero3, "DEEPSPEED", zero_stage=3)
    assert zero3["z3_leaf_modules"]["policy"] == 0  # a dense model has no MoE block to mark
    assert zero3["z3_leaf_modules"]["marked_by_nca_trl"] == [0, 0]  # but both ZeRO-3 engines went through the guard


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


def test_zero3_resume_reproduces_later_losses(zero3, tiny_mistral, runs_dir, launch_env):
    checkpoint = Path(zero3["output_dir"]) / "checkpoint-2"
    args = common_args(tiny_mistral) + ["--ddp_backend", "gloo", "--resume_from_checkpoint", str(checkpoint)]
    resumed = launch(launch_env, ACCEL / "deepspeed_zero3.yaml", args, runs_dir / "zero3_resumed")
    assert_two_processes(resumed, "DEEPSPEED", zero_stage=3)
    assert resumed["start_step"] == 2 and resumed["steps_logged_this_run"] == [3, 4]
    assert losses(resumed)[2:] == pytest.approx(losses(zero3)[2:], rel=1e-5, abs=1e-6)


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


def test_two_machines_on_localhost_infonca_precomputed_reference(tiny_mistral, runs_dir, launch_env):
    """Two `accelerate launch` commands, --num_machines 2, machine rank 0 / 1, one process each, same master address
    and port, InfoNCA with precomputed reference log-probs under ZeRO-3: one world of size 2 whose losses equal a
    single process's with the live reference on the same global batch."""
    out = runs_dir / "two_machines"
    out.mkdir()
    port = free_port()
    train_args = common_args(tiny_mistral, "infonca.yaml") + [
        "--ddp_backend", "gloo", "--precompute_ref_log_probs", "true", "--output_dir", str(out),
    ]
    procs, logs = [], []
    for rank in (0, 1):
        log = runs_dir / f"two_machines_rank{rank}.log"
        logs.append(log)
        extra = ("--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                 "--main_process_ip", "127.0.0.1")
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(
                    _launch_cmd(ACCEL / "deepspeed_zero3.yaml", port, extra) + train_args,
                    cwd=REPO, env=launch_env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                )
            )
    _wait(procs, logs, LAUNCH_TIMEOUT)
    info = read_run(out)
    assert_two_processes(info, "DEEPSPEED", zero_stage=3)
    assert info["num_machines"] == 2 and [p["local_process_index"] for p in info["processes"]] == [0, 0]
    assert info["trainer"] == "InfoNCATrainer" and info["z3_leaf_modules"]["reference"] is None  # no live reference
    assert losses(info)[0] == pytest.approx(math.log(4), abs=1e-6)

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

    from nca_trl.distributed import (
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
