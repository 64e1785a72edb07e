"""`nca_trl.runtime.paths`: the one check of path settings, made before any network call, model load or folder."""

import pytest

from nca_trl.runtime.errors import SettingsError
from nca_trl.runtime.paths import check_path, check_path_settings, looks_local, reward_function_path


@pytest.mark.parametrize("value, local", [
    ("data/does_not_exist.jsonl", True), ("./model", True), ("../model", True), ("/abs/model", True),
    ("~/model", True), ("a/b/c", True), ("recipe.yaml", True), ("weights.safetensors", True),
    ("mistralai/Mistral-7B-v0.1", False), ("Qwen/Qwen2.5-0.5B", False), ("gpt2", False), ("org/name", False),
])
def test_what_reads_as_a_local_path(value, local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_local(value) is local


def test_a_first_folder_that_exists_here_makes_it_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("outputs/model")
    (tmp_path / "outputs").mkdir()
    assert looks_local("outputs/model")


@pytest.mark.parametrize("kind", ["model", "dataset", "file", "folder"])
def test_a_missing_local_path_is_one_line_naming_path_and_setting(kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as error:
        check_path("data/does_not_exist.jsonl", "dataset_name", kind)
    assert str(error.value) == "no such file or folder: data/does_not_exist.jsonl (dataset_name)"
    assert isinstance(error.value, ValueError)  # from Python it is a ValueError like any other setting


def test_existing_paths_unset_values_and_flags_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "model").mkdir()
    for value in ("data.jsonl", "./model", str(tmp_path / "model"), None, ""):
        check_path(value, "s")
    for value in ("true", "True", "last", "latest"):  # `resume_from_checkpoint: true`
        check_path(value, "resume_from_checkpoint", "folder")
    check_path('{"zero_optimization": {"stage": 2}}', "deepspeed", "file")  # inline JSON, not a path


def test_a_hub_id_offline_and_not_cached_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        with pytest.raises(SettingsError, match=r"^org/model \(model_name_or_path\) is neither a local path nor in "
                           r"the Hugging Face cache, and the Hub cannot be reached offline \(HF_HUB_OFFLINE=1\)"):
            check_path("org/model", "model_name_or_path", "model")
        (tmp_path / "hub" / "models--org--model").mkdir(parents=True)
        check_path("org/model", "model_name_or_path", "model")  # cached: fine offline
        (tmp_path / "datasets" / "org___data").mkdir(parents=True)
        check_path("org/data", "dataset_name", "dataset")  # in the datasets library's cache
        check_path("org/other", "dataset_name", "dataset", hub=False)  # a dry run loads nothing
        monkeypatch.delenv("HF_HUB_OFFLINE")
        check_path("org/other", "dataset_name", "dataset")  # online: left to the Hub
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def test_reward_function_files():
    assert reward_function_path("examples/my_rewards.py:f") == "examples/my_rewards.py"
    assert reward_function_path("my_rewards:f") is None and reward_function_path("sorted_digits") is None


def test_path_settings_of_argv_and_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = {"model_name_or_path": "model", "dataset_name": "dataset", "reward_funcs": "file", "datasets": "dataset"}
    with pytest.raises(SettingsError, match=r"^no such file or folder: no.yaml \(config\)$"):
        check_path_settings(["--config", "no.yaml"], settings)
    (tmp_path / "r.yaml").write_text("dataset_name: ./prompts.jsonl\nreward_funcs: [sorted_digits, ./f.py:g]\n")
    with pytest.raises(SettingsError, match=r"^no such file or folder: ./prompts.jsonl \(dataset_name\)$"):
        check_path_settings(["--config", "r.yaml"], settings)
    (tmp_path / "prompts.jsonl").write_text("{}\n")
    with pytest.raises(SettingsError, match=r"^no such file or folder: ./f.py \(reward_funcs\)$"):
        check_path_settings(["--config", "r.yaml"], settings)
    (tmp_path / "f.py").write_text("def g(prompts, completions, **kw): return [0.0] * len(completions)\n")
    assert check_path_settings(["--config", "r.yaml"], settings)["dataset_name"] == "./prompts.jsonl"
    with pytest.raises(SettingsError, match=r"^no such file or folder: x/y.jsonl \(dataset_name\)$"):
        check_path_settings(["--config", "r.yaml", "--dataset_name", "x/y.jsonl"], settings)  # the command line wins
    with pytest.raises(SettingsError, match=r"^no such file or folder: ./g.py \(reward_funcs\)$"):
        check_path_settings(["--reward_funcs", "sorted_digits", "./g.py:f"], settings)
    with pytest.raises(SettingsError, match=r"^no such file or folder: ./m \(model_name_or_path\)$"):
        check_path_settings(["--model_name_or_path=./m"], settings)
    with pytest.raises(SettingsError, match=r"^no such file or folder: d/e.jsonl \(datasets\[1\].path\)$"):
        check_path_settings([], settings, recipe={"datasets": [{"path": "prompts.jsonl"}, {"path": "d/e.jsonl"}]})


# ------------------------------------------------------------------------- every command, every path setting, at once
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "datasets", "accelerate", "deepspeed")
MISSING = "./missing/thing.jsonl"
#: command -> (a command line that passes the path checks, {path setting: what replaces its value (or is added)})
COMMANDS = {
    "train": (["--model_name_or_path", "model", "--dataset_name", "data/vicuna_rated.jsonl", "--output_dir", "out"],
              ["config", "model_name_or_path", "ref_model_name_or_path", "dataset_name", "datasets",
               "resume_from_checkpoint", "deepspeed", "fsdp_config", "accelerator_config"]),
    "generate": (["--model_name_or_path", "model", "--dataset_name", "data/sort_prompts.jsonl", "--output",
                  "out/samples.jsonl"], ["config", "model_name_or_path", "dataset_name"]),
    "score": (["--dataset_name", "data/vicuna_rated.jsonl", "--reward_funcs", "sorted_digits", "--output",
               "out/rated.jsonl"], ["config", "dataset_name", "reward_model", "reward_funcs"]),
    "iterate": (["--model_name_or_path", "model", "--dataset_name", "data/sort_prompts.jsonl", "--reward_funcs",
                 "sorted_digits", "--output_dir", "out"],
                ["config", "model_name_or_path", "dataset_name", "reward_model", "reward_funcs"]),
}
CASES = [(command, setting) for command, (_, settings) in COMMANDS.items() for setting in settings]


def _with(argv: list[str], setting: str, value: str) -> list[str]:
    if setting == "datasets":  # a mixture in the recipe: its entries' paths
        return [*argv, "--config", "mixture.yaml"]
    if setting == "reward_funcs":  # a reward function in a file: `path/file.py:function`
        value += ":f"
    if f"--{setting}" in argv:
        argv = list(argv)
        argv[argv.index(f"--{setting}") + 1] = value
        return argv
    return [*argv, f"--{setting}", value]


def run_cli(cwd: Path, argv: list[str], env: dict | None = None) -> dict:
    """`nca-trl ARGV` in a fresh interpreter in `cwd`: exit status, stderr, seconds, heavy packages imported, and the
    folder's entries afterwards."""
    code = ("import json, sys\nfrom nca_trl.cli import main\nstatus = main(sys.argv[1:])\n"
            f"print(json.dumps({{'status': status, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "HF_HOME": str(cwd / "hf"),
                               **(env if env is not None else {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})})
    seconds = time.time() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "err": proc.stderr, "seconds": seconds,
            "entries": sorted(p.name for p in cwd.iterdir())}


@pytest.fixture
def clone(tmp_path):
    """A user's folder: the repository's data, a model folder (empty: nothing is loaded), a mixture recipe."""
    (tmp_path / "data").symlink_to(REPO / "data")
    (tmp_path / "model").mkdir()
    (tmp_path / "mixture.yaml").write_text(f"datasets:\n  - path: data/vicuna_rated.jsonl\n  - path: {MISSING}\n")
    return tmp_path


@pytest.mark.parametrize("command, setting", CASES, ids=[f"{c}-{s}" for c, s in CASES])
def test_every_command_refuses_a_missing_path_at_once_in_one_line(clone, command, setting):
    """Before: `nca-trl train --dataset_name data/does_not_exist.jsonl` retried the Hub for 33 s, ended in a
    ConnectionError traceback and left an empty output folder; `generate` said it in a 15-line traceback, exit 1, after
    8.6 s. Now: one line, exit 2, before torch is imported (well under 2 s), nothing created."""
    before = sorted(p.name for p in clone.iterdir())
    result = run_cli(clone, [command, *_with(COMMANDS[command][0], setting, MISSING)])
    where = "datasets[1].path" if setting == "datasets" else setting
    assert result["status"] == 2, result
    line = f"nca-trl {command}: error: no such file or folder: {MISSING} ({where})"
    assert result["err"].startswith(line) and result["err"].count("\n") == 1, result  # a recipe name may add a hint
    assert result["heavy"] == [] and result["seconds"] < 2, result
    assert result["entries"] == before  # no output folder, no `out/`


@pytest.mark.parametrize("command, recipe, make", [
    ("train", "tiny/nca.yaml", "nca-trl make-tiny-model outputs/tiny-mistral"),
    ("train", "tiny/nca_mixtral.yaml", "nca-trl make-tiny-model outputs/tiny-mixtral --arch mixtral"),
    ("iterate", "tiny/iterate_nca.yaml", "nca-trl make-tiny-model outputs/tiny-digits --vocab digits"),
    # Spelled otherwise on the command line (the hint named only `outputs/tiny-mistral` exactly before)
    ("train", "tiny/nca.yaml --model_name_or_path ./outputs/tiny-mistral/",
     "nca-trl make-tiny-model ./outputs/tiny-mistral"),
    ("train", "tiny/nca.yaml --model_name_or_path TMP/outputs/tiny-mistral",
     "nca-trl make-tiny-model TMP/outputs/tiny-mistral"),
])
def test_a_tiny_recipe_before_its_model_is_made_says_how_to_make_it(command, recipe, make, tmp_path):
    """In an empty folder, with the Hub not switched off and no network, `nca-trl train --config tiny/nca.yaml` read
    `outputs/tiny-mistral` as a Hub id: 2.5 minutes of retries, then a ConnectionError traceback (offline: "download it
    once online"). The tiny recipes' models are local paths: one line at once, naming the command that makes it."""
    recipe, make = recipe.replace("TMP", str(tmp_path)), make.replace("TMP", str(tmp_path))
    result = run_cli(tmp_path, [command, "--config", *recipe.split()], env={})
    model = recipe.split()[-1] if "--model_name_or_path" in recipe else make.split()[2]
    assert result["status"] == 2 and result["heavy"] == [] and result["seconds"] < 2, result
    assert result["err"].endswith(f"nca-trl {command}: error: no such folder: {model} (model_name_or_path), the tiny "
                                  f"recipes' model: make it first with `{make}`\n"), result
    assert "outputs" not in result["entries"]


@pytest.mark.parametrize("command, setting", [("train", "model_name_or_path"), ("train", "dataset_name"),
                                              ("generate", "model_name_or_path"), ("score", "reward_model"),
                                              ("iterate", "dataset_name")],
                         ids=["train-model", "train-dataset", "generate-model", "score-reward_model", "iterate-dataset"])
def test_a_hub_id_offline_is_one_line_too(clone, command, setting):
    result = run_cli(clone, [command, *_with(COMMANDS[command][0], setting, "some-org/not-cached")])
    assert result["status"] == 2 and result["heavy"] == [], result
    assert result["err"] == (f"nca-trl {command}: error: some-org/not-cached ({setting}) is neither a local path "
                             "nor in the Hugging Face cache, and the Hub cannot be reached offline (HF_HUB_OFFLINE=1): "
                             "download it once online, or give a local path.\n"), result
    assert "out" not in result["entries"]


@pytest.mark.parametrize("script, argv, message", [
    ("plan_memory", ["recipes/none.yaml"],
     "plan_memory.py: error: no such file or folder: recipes/none.yaml (recipes)"),
    ("benchmark", ["--data", "./none.jsonl"], "benchmark.py: error: no such file or folder: ./none.jsonl (--data)"),
])
def test_scripts_refuse_a_missing_input_in_one_line(script, argv, message, tmp_path, monkeypatch, capsys):
    from conftest import load_script

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"{script}.py"])
    with pytest.raises(SystemExit) as exit_:
        load_script(script).main(argv)
    assert exit_.value.code == 2 and capsys.readouterr().err == message + "\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("script, argv", [("plan_memory", ["recipes/none.yaml"]),
                                          ("benchmark", ["--data", "MISSING.jsonl"])])
def test_scripts_refuse_a_missing_input_before_importing_torch(script, argv, tmp_path):
    """`python scripts/SCRIPT.py ARGV` as a user runs it, in a fresh interpreter: the refusal comes before torch,
    transformers or datasets are imported (tens of seconds on a busy machine), so in well under 2 s."""
    code = ("import json, runpy, sys\nsys.argv = sys.argv[1:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n    status = e.code\n"
            f"print(json.dumps({{'status': status, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "scripts" / f"{script}.py"), *argv],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    seconds = time.time() - started
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"status": 2, "heavy": []}, proc.stderr
    assert proc.stderr.startswith(f"{script}.py: error: no such file or folder: ") and proc.stderr.count("\n") == 1
    assert seconds < 2, seconds
    assert list(tmp_path.iterdir()) == []


def test_a_mixture_of_builder_entries_checks_their_data_files(tmp_path, monkeypatch):
    """`- path: json` with `data_files:` names a builder, not a Hub id (refused offline before), and its files are
    local."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text("{}\n")
    settings = {"datasets": "dataset"}
    check_path_settings([], settings, recipe={"datasets": [{"path": "json", "data_files": "a.jsonl"},
                                                           {"path": "csv", "data_files": ["parts/*.csv"]}]})
    files = {"train": "a.jsonl", "test": "b.jsonl"}
    with pytest.raises(SettingsError, match=r"^no such file or folder: b.jsonl \(datasets\[0\].data_files.test\)$"):
        check_path_settings([], settings, recipe={"datasets": [{"path": "json", "data_files": files}]})
