"""nca-trl as a pip user gets it: the sdist and the wheel hold what they should, and the wheel, installed into a fresh
virtual environment, runs the quick start by recipe name in an empty folder, with no clone.

The sdist is built from a copy of the repository, and the wheel from the sdist, so a file missing from the sdist
(MANIFEST.in) is missing from the wheel too. The fresh environment reuses the running environment's packages (torch
and the other dependencies) through a `.pth` file naming its site-packages, so nothing is downloaded
(`--system-site-packages` would not reach another virtual environment's packages); `pip check` then says whether the
wheel's declared dependencies are satisfied there. The wheel's own `nca_trl` comes first on that environment's path.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from launching import free_port, start, tail, wait

REPO = Path(__file__).resolve().parents[1]
#: What a copy of the repository leaves out where git cannot list its files: builds, environments, caches, outputs
NOT_COPIED = (".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".cache",
              "outputs", "results", ".wheels", "*.pyc")


def pep517(hook: str, source: Path, out: Path) -> Path:
    """Run setuptools' PEP 517 `hook` (build_sdist, build_wheel, build_editable) in `source` with the running
    environment's setuptools (no build isolation: nothing downloaded); the built file."""
    code = f"from setuptools import build_meta\nprint(build_meta.{hook}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1]


def copy_repository(dest: Path) -> Path:
    """The repository's files as git sees them (tracked, and untracked but not ignored) copied to `dest`; without git,
    the whole tree but `NOT_COPIED`."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
        return dest
    for name in filter(None, listed):
        path = REPO / name
        if path.is_file():  # a tracked file deleted in the work tree is not there
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / name)
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """`{"sdist": ..., "wheel": ...}`: the sdist of a copy of the repository, and the wheel built from that sdist."""
    work = tmp_path_factory.mktemp("dists")
    source = copy_repository(work / "source")
    sdist = pep517("build_sdist", source, work)
    with tarfile.open(sdist) as archive:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python 3.10.12+
        archive.extractall(work / "unpacked", **safe)
    (unpacked,) = (work / "unpacked").iterdir()
    return {"sdist": sdist, "wheel": pep517("build_wheel", unpacked, work)}


def test_wheel_and_sdist_contents(dists):
    """Before: the wheel held nca_trl/ and two help texts only (no recipes, accelerate configs, data or LICENSE), and the
    repository had no LICENSE."""
    assert (REPO / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read("nca_trl-0.1.0.dist-info/METADATA").decode()
        assert wheel.read("nca_trl-0.1.0.dist-info/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
        # every file of recipes/ and data/, byte for byte, under nca_trl/bundled/
        for folder in ("recipes", "data"):
            for path in (REPO / folder).rglob("*"):
                if path.is_file() and "__pycache__" not in path.parts:
                    inside = f"nca_trl/bundled/{path.relative_to(REPO).as_posix()}"
                    assert wheel.read(inside) == path.read_bytes(), inside
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    for needed in ("mistral-common", "sentencepiece", "protobuf"):  # make-tiny-model's, no longer dev-only
        assert f"Requires-Dist: {needed}>=" in metadata
    assert {"nca_trl/train/help_texts/nca.txt", "nca_trl/runtime/bundled.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "results/")) or "__pycache__" in n]

    with tarfile.open(dists["sdist"]) as sdist:
        held = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for needed in ("LICENSE", "setup.py", "MANIFEST.in", "pyproject.toml", "README.md", "recipes/tiny/nca.yaml",
                   "recipes/accelerate_configs/deepspeed_zero3.yaml", "data/vicuna_rated.jsonl",
                   "nca_trl/train/help_texts/nca.txt"):
        assert needed in held, needed


def fresh_venv(path: Path) -> Path:
    """A virtual environment without pip whose path ends with the running environment's site-packages; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    running = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (Path(own) / "_nca_trl_test_running_env.pth").write_text("\n".join(running) + "\n")
    return python


def pip(python: Path, *args: str) -> str:
    done = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def environment(venv: Path, base: dict | None = None) -> dict:
    """The variables the installed commands run with (`base`, or this process's): offline, the fresh environment's
    bin first, nothing of the checkout on PYTHONPATH."""
    env = {k: v for k, v in (base or os.environ).items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    return env


def run(command: str, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.distributed
def test_installed_wheel_runs_the_quick_start_in_an_empty_folder(dists, tmp_path, tiny_mistral, launch_env):
    """From a fresh environment with only the wheel, in an empty folder: `nca-trl recipes`, `make-tiny-model`, the
    tiny recipe by its name (scaled down) on the bundled data, and a 2-process `accelerate launch` of a bundled
    accelerate config by the path `nca-trl recipes --path` prints."""
    venv = tmp_path / "venv"
    python = fresh_venv(venv)
    pip(python, "install", "--no-index", "--no-deps", "--force-reinstall", str(dists["wheel"]))
    checked = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "check"], capture_output=True,
                             text=True, timeout=300)
    broken = [line for line in checked.stdout.splitlines() if line.lower().startswith(("nca-trl ", "nca_trl "))]
    assert checked.returncode == 0 or checked.stdout.strip(), checked.stderr  # pip check ran
    assert not broken, checked.stdout  # every dependency the wheel declares is there, in a version it accepts
    empty = tmp_path / "empty"
    empty.mkdir()
    env = environment(venv, launch_env)  # one thread per process, the session's DeepSpeed extension cache
    site = Path(run('python -c "import nca_trl; print(nca_trl.__file__)"', empty, env).stdout.strip()).parent
    assert site.is_relative_to(venv), site  # the wheel's package, not the checkout's
    bundle = site / "bundled"

    listing = run("nca-trl recipes", empty, env).stdout
    for name in ("tiny/nca.yaml", "accelerate_configs/deepspeed_zero3.yaml", "data/vicuna_rated.jsonl"):
        assert f"  {name} " in listing and str(bundle / ("" if name.startswith("data/") else "recipes") / name) in \
            listing

    # The pip quick start (README), scaled down as its doc test is
    made = run("nca-trl make-tiny-model outputs/tiny-mistral", empty, env)
    assert "written to" in made.stdout
    model = empty / "outputs" / "tiny-mistral"
    assert {p.name: p.read_bytes() for p in model.iterdir()} == \
        {p.name: p.read_bytes() for p in Path(tiny_mistral).iterdir()}  # the same bytes as the checkout's build
    trained = run("nca-trl train --config tiny/nca.yaml --max_steps 2 --report_train_prompts 2 --max_eval_samples 2",
                  empty, env)
    assert f"using the bundled recipe {bundle / 'recipes' / 'tiny' / 'nca.yaml'}" in trained.stderr
    assert f"using the bundled data {bundle / 'data' / 'vicuna_rated.jsonl'}" in trained.stderr
    assert "| ranking accuracy | 0.000 |" in trained.stdout and "nca-trl: NCATrainer finished" in trained.stdout
    info = json.loads((empty / "outputs" / "tiny-nca" / "run_info.json").read_text())
    assert info["global_step"] == 2 and info["settings"]["dataset_name"] == str(bundle / "data" / "vicuna_rated.jsonl")
    assert info["versions"]["nca-trl"] == "0.1.0"

    # 2 CPU processes under DeepSpeed ZeRO-3, the config by its printed path (recipes/tiny/nca.yaml's comment)
    launch = (f'"{python}" -m accelerate.commands.launch --config_file '
              '"$(nca-trl recipes --path accelerate_configs/deepspeed_zero3.yaml)" '
              f"--num_processes 2 --mixed_precision no --main_process_port {free_port()} "
              "-m nca_trl.cli train --config tiny/nca.yaml --ddp_backend gloo --max_steps 2 --report_train_prompts 0 "
              "--per_device_train_batch_size 1 --max_train_samples 4 --output_dir outputs/launched")
    log = tmp_path / "launch.log"
    wait([start(["bash", "-c", launch], log, env, cwd=empty)], [log])
    launched = json.loads((empty / "outputs" / "launched" / "run_info.json").read_text())
    assert (launched["world_size"], launched["distributed_type"], launched["zero_stage"]) == (2, "DEEPSPEED", 3), \
        tail(log)
    assert launched["global_step"] == 2 and launched["backend"] == "gloo"
    assert sorted(p.name for p in empty.iterdir()) == ["outputs"]  # nothing written but the outputs


@pytest.mark.slow
def test_editable_install_reads_the_repositorys_folders(tmp_path):
    """`pip install -e .` (CI's install): the recipes and data are the source tree's own, nothing copied into it."""
    source = copy_repository(tmp_path / "source")
    python = fresh_venv(tmp_path / "venv")
    pip(python, "install", "--no-index", "--no-deps", "--no-build-isolation", "--force-reinstall", "-e", str(source))
    env = environment(tmp_path / "venv")
    empty = tmp_path / "empty"
    empty.mkdir()
    printed = run("nca-trl recipes --path tiny/nca.yaml", empty, env).stdout.strip()
    assert printed == str(source / "recipes" / "tiny" / "nca.yaml")
    assert not (source / "nca_trl" / "bundled").exists()
