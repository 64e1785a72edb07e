"""`nca-trl make-tiny-model` / `nca_trl.tiny`: the same command writes the same bytes whether or not its folder
existed, refuses a folder of other things or another model unless `--overwrite`, checks what it needs before writing
anything, and a failed build leaves no folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nca_trl import tiny
from nca_trl.cli import main

REPO = Path(__file__).resolve().parents[1]
VICUNA = REPO / "data" / "vicuna_rated.jsonl"


def files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def leftovers(folder: Path) -> list[str]:
    """Temporary folders of a build left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if ".nca-trl-" in p.name)


@pytest.mark.slow
def test_rebuild_over_another_model_writes_the_first_builds_bytes(tiny_mistral, tmp_path):
    """Before: a build into a folder that already held a model converted the tokenizer next to the old config.json, and
    AutoTokenizer took the class from it (TokenizersBackend instead of LlamaTokenizer): another tokenizer.json and
    tokenizer_config.json, which encoded 30 of the 400 texts of data/vicuna_rated.jsonl differently. The second build
    runs as a user would, on the command line, without HF_HUB_OFFLINE (which was recorded in tokenizer_config.json).
    The root cause alone is the fast test below."""
    from transformers import AutoTokenizer

    first = files(tiny_mistral)  # the session's seed-0 model, built into an empty folder
    assert set(first) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer.model", "tokenizer_config.json", "chat_template.jinja"}
    assert json.loads(first["tokenizer_config.json"])["tokenizer_class"] == "LlamaTokenizer"
    folder = tmp_path / "tiny"
    tiny.build_tiny_model(folder, seed=1)  # another model in the folder first
    assert files(folder)["model.safetensors"] != first["model.safetensors"]
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    cli = [sys.executable, "-m", "nca_trl.cli", "make-tiny-model", str(folder), "--overwrite"]
    done = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "replacing what it held" in done.stdout
    assert files(folder) == first
    assert leftovers(tmp_path) == []

    rows = [json.loads(line) for line in VICUNA.read_text().splitlines()]
    texts = [r["prompt"] for r in rows] + [c for r in rows for c in r["completions"]]
    assert len(texts) == 400
    reference, rebuilt = AutoTokenizer.from_pretrained(tiny_mistral), AutoTokenizer.from_pretrained(folder)
    assert [reference(t)["input_ids"] for t in texts] == [rebuilt(t)["input_ids"] for t in texts]


def test_tokenizer_saved_next_to_a_model_is_the_same(tiny_mistral, tmp_path):
    """The root cause: `save_mistral_tokenizer` into a folder holding a model's config.json wrote other files."""
    folder = tmp_path / "beside-a-model"
    folder.mkdir()
    (folder / "config.json").write_bytes((Path(tiny_mistral) / "config.json").read_bytes())
    tiny.save_mistral_tokenizer(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja"):
        assert (folder / name).read_bytes() == (Path(tiny_mistral) / name).read_bytes(), name


def make(*argv, capsys) -> tuple[int, str, str]:
    status = main(["make-tiny-model", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err


def one_line_error(err: str, *parts: str) -> None:
    assert err.startswith("nca-trl make-tiny-model: error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and all(part in err for part in parts), err


def test_make_tiny_model_refuses_other_folders_unless_overwrite(tmp_path, capsys):
    digits = ("--vocab", "digits")
    fresh = tmp_path / "fresh"
    assert make(fresh, *digits, capsys=capsys)[0] == 0
    built = files(fresh)

    # The same command again: the same files, left as they are
    stamps = {p.name: p.stat().st_mtime_ns for p in fresh.iterdir()}
    status, out, _ = make(fresh, *digits, capsys=capsys)
    assert status == 0 and "already in (the same files, left as they are)" in out
    assert {p.name: p.stat().st_mtime_ns for p in fresh.iterdir()} == stamps

    # An empty folder is filled; a missing parent is created
    (tmp_path / "empty").mkdir()
    assert make(tmp_path / "empty", *digits, capsys=capsys)[0] == 0 and files(tmp_path / "empty") == built
    assert make(tmp_path / "a" / "b" / "c", *digits, capsys=capsys)[0] == 0
    assert files(tmp_path / "a" / "b" / "c") == built

    # Another model (another seed): refused, untouched; --overwrite replaces it with the same bytes as a fresh build
    other = tmp_path / "other"
    assert make(other, *digits, "--seed", "1", capsys=capsys)[0] == 0
    before = files(other)
    status, _, err = make(other, *digits, capsys=capsys)
    assert status == 2 and files(other) == before
    one_line_error(err, f"{other} holds another model (other contents: model.safetensors)", "--overwrite")
    assert make(other, *digits, "--overwrite", capsys=capsys)[0] == 0 and files(other) == built

    # A folder of other things: refused before anything is built; --overwrite replaces all of it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    status, _, err = make(mine, *digits, capsys=capsys)
    assert status == 2 and files(mine) == {"notes.txt": b"keep me"}
    one_line_error(err, f"{mine} is not empty and holds what make-tiny-model does not write (notes.txt)")
    assert make(mine, *digits, "--overwrite", capsys=capsys)[0] == 0 and files(mine) == built

    # A model folder with one more file is another folder too
    (fresh / "extra.bin").write_bytes(b"x")
    status, _, err = make(fresh, *digits, capsys=capsys)
    assert status == 2 and (fresh / "extra.bin").exists()
    one_line_error(err, "extra.bin")

    # A file where the folder should be
    (tmp_path / "file").write_text("")
    status, _, err = make(tmp_path / "file", *digits, "--overwrite", capsys=capsys)
    assert status == 2
    one_line_error(err, "is a file, not a folder")
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "a" / "b") == []


def test_a_failed_build_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """Before: the tokenizer was written first, so a build that failed later left a folder with a tokenizer and no
    model (or, without mistral-common, a model and no tokenizer), which the next command failed on elsewhere."""
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "model_config", broken)
    target = tmp_path / "outputs" / "tiny-mistral"
    with pytest.raises(RuntimeError, match="disk full"):
        main(["make-tiny-model", str(target)])
    assert list(tmp_path.iterdir()) == []  # neither the folder, nor its parent, nor the temporary folder

    # Over an existing model: that model stays as it was
    monkeypatch.undo()
    kept = tmp_path / "kept"
    tiny.build_tiny_model(kept, vocab="digits", max_position_embeddings=64)
    before = files(kept)
    monkeypatch.setattr(tiny, "model_config", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["make-tiny-model", str(kept), "--vocab", "digits", "--overwrite"])
    assert files(kept) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("module, package", [("mistral_common", "mistral-common"), ("sentencepiece", "sentencepiece"),
                                             ("google.protobuf", "protobuf")])
def test_a_missing_package_is_one_line_before_anything_is_written(module, package, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.delenv("NCA_TRL_MISTRAL_TOKENIZER", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name, *a))
    status, _, err = make(tmp_path / "m", capsys=capsys)
    assert status == 2
    one_line_error(err, f"need the Python package `{package}`", f"pip install {package}")
    assert list(tmp_path.iterdir()) == []


def test_the_packages_it_needs_are_dependencies_of_the_package():
    """Before: mistral-common, sentencepiece and protobuf were in the `dev` extra only, so `pip install nca-trl` gave
    a make-tiny-model that failed half-way."""
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~ \[;]", d)[0].lower() for d in project["dependencies"]}
    needed = {package for packages in tiny.REQUIREMENTS.values() for _, package, _ in packages}
    assert needed and needed <= declared, needed - declared


def test_tokenizer_override_must_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NCA_TRL_MISTRAL_TOKENIZER", str(tmp_path / "nope.model"))
    status, _, err = make(tmp_path / "m", capsys=capsys)
    assert status == 2
    one_line_error(err, f"no such file or folder: {tmp_path / 'nope.model'} (NCA_TRL_MISTRAL_TOKENIZER)")
    assert not (tmp_path / "m").exists()
