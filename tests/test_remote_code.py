"""Models of remote code (a checkpoint's own Python files, named by its config's `auto_map`) in the rated-data loop.

`nca-trl train` trains them with `trust_remote_code` (TRL's), but `nca-trl generate` and `nca-trl iterate`'s
evaluation had no such switch: they stopped at transformers' "contains custom code which must be executed". The model
here is a tiny Mistral whose config and model classes live in its folder (`model_type` "tiny_remote"), so its samples
equal the built-in Mistral's.
"""

from __future__ import annotations

import json
import shutil

import pytest

from test_generate import _read_jsonl, _write_jsonl
from test_preflight import refused

CONFIGURATION = '''from transformers import MistralConfig


class TinyRemoteConfig(MistralConfig):
    model_type = "tiny_remote"
'''
MODELING = '''from transformers import MistralForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(MistralForCausalLM):
    config_class = TinyRemoteConfig
'''


@pytest.fixture(scope="module")
def remote_model(tiny_mistral, tmp_path_factory):
    """The tiny Mistral's weights and tokenizer as a model of remote code."""
    folder = tmp_path_factory.mktemp("remote") / "tiny-remote"
    shutil.copytree(tiny_mistral, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tiny_remote", architectures=["TinyRemoteForCausalLM"], auto_map={
        "AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM",
    })
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_tiny_remote.py").write_text(CONFIGURATION)
    (folder / "modeling_tiny_remote.py").write_text(MODELING)
    return str(folder)


def generate_argv(model, data, output, *extra):
    return ["generate", "--model_name_or_path", str(model), "--dataset_name", data, "--output", str(output),
            "--num_completions", "2", "--max_new_tokens", "5", "--dtype", "float32", *extra]


def test_generate_samples_a_model_of_remote_code_when_allowed(remote_model, tiny_mistral, hh, tmp_path):
    from nca_trl.cli import main

    data = _write_jsonl(tmp_path / "prompts.jsonl", [hh[i] for i in range(3)])
    assert main(generate_argv(remote_model, data, tmp_path / "remote.jsonl", "--trust_remote_code", "true")) == 0
    assert main(generate_argv(tiny_mistral, data, tmp_path / "builtin.jsonl")) == 0
    remote, builtin = _read_jsonl(tmp_path / "remote.jsonl"), _read_jsonl(tmp_path / "builtin.jsonl")
    assert len(remote) == 3 and [r["completions"] for r in remote] == [r["completions"] for r in builtin]


def test_generate_refuses_a_model_of_remote_code_not_allowed_before_writing(remote_model, hh, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "prompts.jsonl", [hh[0]])
    err = refused(generate_argv(remote_model, data, tmp_path / "samples.jsonl"), capsys)
    assert err == (f"{remote_model} is a model of remote code (model_type 'tiny_remote', its own Python files named "
                   "by config.json's auto_map), which runs only when allowed: set `trust_remote_code: true` "
                   "(`--trust_remote_code true`; for `nca-trl iterate`, in its `training:` mapping) after reading "
                   "those files.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]


def test_iterate_generates_and_evaluates_with_the_training_trust_remote_code(remote_model, tmp_path):
    from pathlib import Path

    from nca_trl.iterate import parse_iterate_args
    from nca_trl.iterate.evaluate import kl_to_initial

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "iterate_nca.yaml")
    argv = ["--config", recipe, "--model_name_or_path", remote_model, "--output_dir", str(tmp_path / "run")]
    allowed = parse_iterate_args([*argv, "--training", '{"trust_remote_code": true}'])
    assert allowed.stages.generate.trust_remote_code and allowed.stages.train.training.trust_remote_code
    for training in ([], ["--training", '{"trust_remote_code": "false"}']):  # a string parsed as nca-trl train does
        for loss in ("nca", "dpo"):  # `loss: dpo`'s refusal named generate's `--trust_remote_code true` too
            with pytest.raises(ValueError, match=r"is a model of remote code .*set `trust_remote_code: true` in the "
                               r"`training:` mapping of the iterate run after"):
                parse_iterate_args([*argv, "--loss", loss, *training])
    # The evaluation's KL proxy loads the policy and the initial model (here the same: 0)
    samples = [{"prompt": "Count to three:", "completions": ["one two three", "1 2 3"]}]
    assert kl_to_initial(samples, remote_model, remote_model, "float32", 2, trust_remote_code=True) == 0.0


def test_train_refuses_a_model_of_remote_code_not_allowed_before_loading(remote_model, tmp_path, capsys):
    from test_preflight import train_argv

    err = refused(train_argv(tmp_path, remote_model), capsys)
    assert err.startswith(f"{remote_model} is a model of remote code (model_type 'tiny_remote'") and err.endswith(
        "set `trust_remote_code: true` (`--trust_remote_code true`) after reading those files.\n"), err
    assert not (tmp_path / "out").exists()


def test_a_built_in_model_whose_config_keeps_an_auto_map_loads_by_its_type(tiny_mistral, tmp_path):
    """Checkpoints made before their type was built into transformers keep an `auto_map`, which runs only with
    `trust_remote_code`: without it the built-in class loads (Mistral 3 here, by `AutoModelForImageTextToText`), and
    neither `nca-trl generate` nor `nca-trl train` refuses it."""
    from model_families import build_family

    from nca_trl.generation.arguments import GenerateArguments
    from nca_trl.runtime.models import load_text_model

    folder = tmp_path / "tiny-mistral3"
    build_family("mistral3_multimodal").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_m.C", "AutoModel": "modeling_m.M"}  # no such files
    (folder / "config.json").write_text(json.dumps(config))
    assert type(load_text_model(str(folder))).__name__ == "Mistral3ForConditionalGeneration"
    GenerateArguments(model_name_or_path=str(folder), dataset_name="p.jsonl", output=str(tmp_path / "s.jsonl"))
