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
