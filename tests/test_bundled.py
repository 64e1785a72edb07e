"""The bundled recipes, accelerate configs and data (`nca_trl.runtime.bundled`): `nca-trl recipes` lists them with
full paths, `--path` and `--copy`, and a command's `--config NAME` / `dataset_name: data/NAME` that is not a file here
falls back to the bundled one, saying so. The wheel's copy of them is checked in tests/test_wheel.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nca_trl.cli import main
from nca_trl.runtime import bundled
from nca_trl.runtime.bundled import find_bundled, resolve_argv

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "deepspeed", "datasets", "accelerate")


def run_cli(*argv, cwd) -> subprocess.CompletedProcess:
    """`nca-trl ARGV` in a fresh interpreter in `cwd`; its stdout ends with the heavy modules it imported."""
    code = ("import json, sys\nfrom nca_trl.cli import main\nstatus = main(sys.argv[1:])\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\nsys.exit(status)")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(cwd)})


def one_line_error(err: str, command: str, *parts: str) -> None:
    assert err.startswith(f"nca-trl {command}: error: ") and len(err.strip().splitlines()) == 1, err
    assert all(part in err for part in parts), err


def test_in_a_clone_the_bundle_is_the_repository():
    """An editable install (and a clone) reads recipes/ and data/ themselves: nothing is copied into the source."""
    assert bundled.bundle_root() == REPO
    assert not (REPO / "nca_trl" / "bundled").exists()
    expected = {p.relative_to(REPO / "recipes").as_posix() for p in (REPO / "recipes").rglob("*") if p.is_file()}
    expected |= {f"data/{p.name}" for p in (REPO / "data").iterdir()}
    assert set(bundled.catalog()) == expected
    assert {"tiny/nca.yaml", "accelerate_configs/deepspeed_zero3.yaml", "data/vicuna_rated.jsonl"} <= expected


def test_a_wheels_own_copy_comes_first(tmp_path, monkeypatch):
    package = tmp_path / "nca_trl"
    (package / "bundled" / "recipes" / "tiny").mkdir(parents=True)
    (package / "bundled" / "recipes" / "tiny" / "nca.yaml").write_text("loss: nca\n")
    monkeypatch.setattr(bundled, "PACKAGE", package)
    assert bundled.bundle_root() == package / "bundled"
    assert find_bundled("tiny/nca.yaml") == package / "bundled" / "recipes" / "tiny" / "nca.yaml"
    (package / "bundled" / "recipes" / "tiny" / "nca.yaml").unlink()
    (package / "bundled" / "recipes" / "tiny").rmdir()
    (package / "bundled" / "recipes").rmdir()
    with pytest.raises(FileNotFoundError, match="Reinstall nca-trl"):
        bundled.bundle_root()


def test_recipes_lists_every_bundled_file_with_its_full_path_and_imports_nothing_heavy(tmp_path):
    """Before: `nca-trl recipes` was an unknown command, and nothing said where the recipes were."""
    done = run_cli("recipes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    *lines, heavy = done.stdout.rstrip("\n").split("\n")
    assert json.loads(heavy) == []
    text = "\n".join(lines)
    for name, path in bundled.catalog().items():
        assert f"  {name} " in text and str(path) in text, name
    for section in ("recipes (", "accelerate configs (", "data ("):
        assert f"\n{section}" in text
    # each listed path is the file: a line is `  NAME  PATH`
    listed = dict(line.split() for line in lines if line.startswith("  "))
    assert {name: Path(path) for name, path in listed.items()} == bundled.catalog()


def test_recipes_path_and_copy(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "--path", "accelerate_configs/deepspeed_zero3.yaml"]) == 0
    assert capsys.readouterr().out == f"{REPO / 'recipes' / 'accelerate_configs' / 'deepspeed_zero3.yaml'}\n"
    assert main(["recipes", "--path", "recipes/tiny/nca.yaml"]) == 0  # the clone's path works too
    assert capsys.readouterr().out == f"{REPO / 'recipes' / 'tiny' / 'nca.yaml'}\n"

    assert main(["recipes", "--path", "deepspeed_zero3.yaml"]) == 2
    one_line_error(capsys.readouterr().err, "recipes", "no bundled file named deepspeed_zero3.yaml",
                   "did you mean accelerate_configs/deepspeed_zero3.yaml", "`nca-trl recipes` lists them")
    assert main(["recipes", "--path", "x", "--copy", "y", "z"]) == 2
    one_line_error(capsys.readouterr().err, "recipes", "not allowed with argument")

    assert main(["recipes", "--copy", "tiny/nca.yaml", "mine"]) == 0
    copied = tmp_path / "mine" / "nca.yaml"
    assert capsys.readouterr().out == "mine/nca.yaml\n"
    assert copied.read_bytes() == (REPO / "recipes" / "tiny" / "nca.yaml").read_bytes()
    assert main(["recipes", "--copy", "tiny/nca.yaml", "mine"]) == 0  # the same file again: nothing to do
    copied.write_text(copied.read_text() + "max_steps: 3\n")
    assert main(["recipes", "--copy", "tiny/nca.yaml", "mine"]) == 2
    one_line_error(capsys.readouterr().err, "recipes", "mine/nca.yaml exists (and differs from the bundled")
    assert copied.read_text().endswith("max_steps: 3\n")
    (tmp_path / "afile").write_text("x")  # a FileExistsError traceback, exit 1, before
    assert main(["recipes", "--copy", "tiny/nca.yaml", "afile"]) == 2
    one_line_error(capsys.readouterr().err, "recipes", "afile is a file")


def test_config_and_data_fall_back_to_the_bundled_ones(tmp_path, monkeypatch):
    """Before: `nca-trl train --config tiny/nca.yaml` outside a clone was "no such recipe file", and the tiny recipe's
    `dataset_name: data/vicuna_rated.jsonl` only resolved in the repository's root."""
    monkeypatch.chdir(tmp_path)
    recipe = str(REPO / "recipes" / "tiny" / "nca.yaml")
    data = str(REPO / "data" / "vicuna_rated.jsonl")
    notes = []
    argv = resolve_argv(["--config", "tiny/nca.yaml", "--max_steps", "2"], notes)
    assert argv == ["--config", recipe, "--max_steps", "2", "--dataset_name", data]
    assert notes == [f"--config tiny/nca.yaml: no such file here, using the bundled recipe {recipe}",
                     f"dataset_name data/vicuna_rated.jsonl: no such file here, using the bundled data {data}"]
    assert resolve_argv(["--config=recipes/tiny/nca.yaml"], []) == [f"--config={recipe}", "--dataset_name", data]
    # on the command line too, in either spelling
    assert resolve_argv(["--model_name_or_path", "m", "--dataset-name", "./data/vicuna_rated.jsonl"], []) == \
        ["--model_name_or_path", "m", "--dataset-name", data]
    # a Hub id, an absolute path, a missing file that is not bundled: left to the command's own checks
    for argv in (["--dataset_name", "org/data"], ["--dataset_name", "/nowhere/x.jsonl"],
                 ["--dataset_name", "data/mine.jsonl"]):
        assert resolve_argv(argv, notes := []) == argv and notes == []

    # Local files win, and nothing is said
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "nca.yaml").write_text("loss: nca\ndataset_name: data/vicuna_rated.jsonl\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "vicuna_rated.jsonl").write_text("{}\n")
    assert resolve_argv(["--config", "tiny/nca.yaml"], notes := []) == ["--config", "tiny/nca.yaml"] and notes == []

    with pytest.raises(ValueError, match=r"no such file or folder: tiny/nope.yaml \(config\), and no bundled recipe "
                                         r"of that name: `nca-trl recipes` lists them"):
        resolve_argv(["--config", "tiny/nope.yaml"])


def test_train_by_recipe_name_from_an_empty_folder(tmp_path, tiny_mistral, monkeypatch, capsys):
    """`nca-trl train --config tiny/nca.yaml` in a folder without recipes/ or data/: the bundled recipe and data,
    told on stderr (a dry run: the parse is what changes)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "tiny/nca.yaml", "--model_name_or_path", str(tiny_mistral), "--dry_run",
                 "true"]) == 0
    captured = capsys.readouterr()
    assert f"using the bundled recipe {REPO / 'recipes' / 'tiny' / 'nca.yaml'}" in captured.err
    assert f"using the bundled data {REPO / 'data' / 'vicuna_rated.jsonl'}" in captured.err
    assert f'"dataset_name": "{REPO / "data" / "vicuna_rated.jsonl"}"' in captured.out
    assert list(tmp_path.iterdir()) == []

    assert main(["train", "--config", "tiny/no-such.yaml"]) == 2
    one_line_error(capsys.readouterr().err, "train", "no such file or folder: tiny/no-such.yaml (config)",
                   "`nca-trl recipes` lists them")


def test_under_a_launch_only_the_main_process_tells(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    resolve_argv(["--config", "tiny/nca.yaml"])
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    resolve_argv(["--config", "tiny/nca.yaml"])
    assert capsys.readouterr().err.count("[nca-trl] ") == 2
