"""`accelerate launch -m nca_trl.cli train` from the installed package alone, and the FSDP2 accelerate config.

Pipelines that pip-install nca-trl have no scripts/ folder: the launch here runs in a temporary folder outside the
checkout, with a copied recipe and data file given by paths relative to that folder, an environment whose PYTHONPATH
holds nothing of the checkout, and nca_trl imported from where the `nca-trl` distribution is installed (editable in
development and CI, so there that is the checkout's nca_trl/, found through the install and not through the cwd).

FSDP2 (recipes/accelerate_configs/fsdp2.yaml, TRL's own settings) is GPU-only here: torch's `fully_shard` runs on CPU
processes over gloo, but accelerate sets FSDP up only for GPU-like devices (`AcceleratorState` turns the FSDP plugin
on in its MULTI_GPU-family branch). On CPU processes a launch of fsdp2.yaml is MULTI_CPU plain data parallel with
`use_cpu: true`, and without it 2 processes in one gloo group whose distributed type is NO (2 independent trainings).
What runs here: accelerate's own launcher reads fsdp2.yaml into an FSDP2 plugin that wraps the tiny models' decoder
layers, and a CPU launch of it must fail loudly instead of training something else.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
import yaml

from launching import (
    ACCEL,
    DDP_CPU_ARGS,
    REPO,
    VICUNA,
    assert_world_of_two,
    common_args,
    cpu_config,
    free_port,
    launch,
    launch_cmd,
    losses,
    start,
    tail,
    wait,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
INSTALLED_CLI = ("-m", "nca_trl.cli", "train")  # what a pipeline without the checkout launches


def installed_nca_trl() -> Path:
    """nca_trl/__init__.py of the installed `nca-trl` distribution: in the source folder of an editable install, in
    site-packages otherwise."""
    dist = metadata.distribution("nca-trl")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        root = Path(url2pathname(urlparse(direct_url["url"]).path))
    else:
        root = Path(dist.locate_file(""))
    return (root / "nca_trl" / "__init__.py").resolve()


def outside_env(env: dict) -> dict:
    """`env` without any PYTHONPATH entry inside the checkout."""
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not Path(p).resolve().is_relative_to(REPO)]
    env = dict(env)
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    return env


@pytest.fixture
def pipeline(tmp_path, tiny_mistral):
    """A folder outside the checkout laid out as the tiny recipe expects: nca.yaml, data/, outputs/tiny-mistral."""
    work = tmp_path / "pipeline"
    (work / "data").mkdir(parents=True)
    (work / "outputs").mkdir()
    assert not work.resolve().is_relative_to(REPO)
    shutil.copy(REPO / "recipes" / "tiny" / "nca.yaml", work / "nca.yaml")
    shutil.copy(VICUNA, work / "data" / VICUNA.name)
    (work / "outputs" / "tiny-mistral").symlink_to(Path(tiny_mistral).resolve())
    return work


# The recipe's own relative paths, resolved against the launch's cwd (the pipeline folder)
RELATIVE = {"config": "nca.yaml", "model": "outputs/tiny-mistral", "dataset": "data/vicuna_rated.jsonl"}


@pytest.mark.slow
@pytest.mark.distributed
def test_installed_package_launches_outside_the_repository(pipeline, launch_env):
    env = outside_env(launch_env)
    seen = subprocess.run(
        [sys.executable, "-c", "import nca_trl; print(nca_trl.__file__)"],
        cwd=pipeline, env=env, capture_output=True, text=True, check=True,
    )
    assert Path(seen.stdout.strip()).resolve() == installed_nca_trl()
    assert not (pipeline / "nca_trl").exists()

    info = launch(
        env, cpu_config(pipeline / "ddp_cpu.yaml"), common_args(**RELATIVE) + list(DDP_CPU_ARGS), pipeline / "run",
        target=INSTALLED_CLI, cwd=pipeline,
    )
    assert_world_of_two(info, "MULTI_CPU")
    assert info["trainer"] == "NCATrainer" and info["versions"]["nca-trl"] == metadata.version("nca-trl")
    assert not (pipeline / "run" / "probe.json").exists()  # the package's own entry point, not the tests' probe
    assert [s["step"] for s in info["step_losses"]] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) for loss in losses(info))
    assert losses(info)[0] == pytest.approx(2 * math.log(2), abs=1e-6)  # implicit reference: every log-ratio is 0
    assert (pipeline / "run" / "model.safetensors").exists()


def test_fsdp2_config_is_trls_and_accelerate_reads_it_as_fsdp2(tiny_mistral, tiny_mixtral, monkeypatch):
    """No launch: accelerate's own launcher turns fsdp2.yaml into the environment of its processes, from which an
    FSDP2 plugin is built that wraps each decoder layer (Mixtral's MoE blocks inside theirs)."""
    import trl
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from transformers import AutoModelForCausalLM

    ours = yaml.safe_load((ACCEL / "fsdp2.yaml").read_text())
    assert ours == yaml.safe_load((Path(trl.__file__).parent / "accelerate_configs" / "fsdp2.yaml").read_text())
    assert ours["num_processes"] == 8 and ours["num_machines"] == 1 and ours["distributed_type"] == "FSDP"

    args = launch_command_parser().parse_args(["--config_file", str(ACCEL / "fsdp2.yaml"), *INSTALLED_CLI])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        if key.startswith("FSDP_") or key == "ACCELERATE_USE_FSDP":
            monkeypatch.setenv(key, value)
    for model_dir, layer in ((tiny_mistral, "MistralDecoderLayer"), (tiny_mixtral, "MixtralDecoderLayer")):
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.state_dict_type.name == "FULL_STATE_DICT" and plugin.cpu_ram_efficient_loading
        assert not plugin.activation_checkpointing  # the recipes' `activation_checkpointing` does it instead
        plugin.set_auto_wrap_policy(AutoModelForCausalLM.from_pretrained(model_dir))
        assert plugin.transformer_cls_names_to_wrap == [layer]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("use_cpu", [True, False], ids=["use_cpu", "no_use_cpu"])
def test_fsdp2_on_cpu_processes_fails_loudly(use_cpu, tiny_mistral, tmp_path, launch_env):
    """FSDP needs GPUs (see the module docstring): on CPU processes the launch must stop before training instead of
    reporting a world of 2 that is not FSDP."""
    if use_cpu:
        config, extra = cpu_config(tmp_path / "fsdp2_cpu.yaml", "fsdp2"), list(DDP_CPU_ARGS)
    else:
        config, extra = ACCEL / "fsdp2.yaml", ["--ddp_backend", "gloo"]
    out, log = tmp_path / "run", tmp_path / "run.log"
    cmd = launch_cmd(config, free_port(), ("--num_processes", "2"), INSTALLED_CLI)
    train_args = common_args(tiny_mistral) + extra + ["--output_dir", str(out)]
    proc = start(cmd + train_args, log, launch_env, cwd=tmp_path)  # outside the checkout: the installed package
    wait([proc], [log], check=False)
    text = log.read_text(errors="replace")
    assert proc.returncode != 0, tail(log)
    assert text.count("nca-trl train: error: FSDP needs GPUs") == 2  # one line from each process (no traceback)
    assert not (out / "run_info.json").exists()
