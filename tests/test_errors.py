"""One error contract for every command (docs/failures.md): a refused setting is one line, `nca-trl CMD: error:
MESSAGE`, exit status 2, and leaves nothing behind, also when it is found after the arguments are parsed (a split
the data does not have, a `max_length` no prompt fits, more prompts per round than the data holds)."""

import re
from pathlib import Path

import pytest

from nca_trl.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A user's folder: the repository's data and recipes, and an empty model folder (these refusals load no model)."""
    for name in ("data", "recipes"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "model").mkdir()
    (tmp_path / "gen").mkdir()  # what `nca-trl generate --output gen/samples.jsonl` writes
    (tmp_path / "gen" / "samples.jsonl").write_text('{"prompt": "p", "completions": ["a", "b"]}\n')
    (tmp_path / "gen" / "samples.generation.json").write_text('{"output": "gen/samples.jsonl"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(argv: list[str], capsys) -> str:
    """Run `nca-trl ARGV`: it must exit 2 with one error line on stderr (after the run's `[nca-trl] ...` log lines,
    if it got that far) and no traceback; that line, without its prefix."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    prefix = f"nca-trl {argv[0]}: error: "
    *logged, line = err.splitlines()
    assert line.startswith(prefix) and err.endswith("\n") and "Traceback" not in err, err
    assert all(entry.startswith("[nca-trl] ") for entry in logged), err
    return line.removeprefix(prefix).strip()


TRAIN = ["train", "--config", "recipes/tiny/nca.yaml", "--model_name_or_path", "model", "--output_dir", "outputs/run"]


@pytest.mark.parametrize("argv, message", [
    # found when the data is loaded (before: a ValueError traceback, exit 1, and an empty outputs/run left behind)
    ([*TRAIN, "--dataset_train_split", "nosplit"],
     "Split 'nosplit' not found; the data has splits ['train'] (`dataset_train_split`)."),
    ([*TRAIN, "--dataset_name", "recipes/tiny/nca.yaml"], "Unknown data file type '.yaml'"),
    ([*TRAIN, "--dataset_format_kwargs", '{"score_field": "x"}'], "`dataset_format_kwargs` apply to the raw layouts"),
    # in the command line's words (it said "pass dataset_format='auto'")
    ([*TRAIN, "--dataset_format", "preference"], "`dataset_format: preference` in the recipe (or `--dataset_format "
     "preference`) was asked for but row 0 is in the 'rated' format. Fix: pass `dataset_format: auto` in the recipe"),
    # found when the arguments are parsed (before: after the data was loaded, a traceback)
    (["train", "--model_name_or_path", "model", "--dataset_name", "data/vicuna_rated.jsonl", "--output_dir",
      "outputs/run", "--eval_strategy", "steps"], "`eval_strategy: steps` needs evaluation data"),
    # generate's folder given for its output file: a 5 KB Arrow cast error over the sidecar
    ([*TRAIN, "--dataset_name", "gen"], "gen is a folder holding samples.generation.json, the record of a generate "
     "or score run, which would be read as rows too: pass the data file itself (dataset_name), e.g. gen/samples.jsonl"),
    ([*TRAIN, "--eval_fraction", "0"], "`eval_fraction` must be in (0, 1), got 0.0: for no evaluation set, leave it "
     "unset (`eval_fraction: null`, or `--eval_fraction null`)."),
    (["generate", "--model_name_or_path", "model", "--dataset_name", "data/sort_prompts.jsonl", "--dataset_split",
      "test", "--output", "outputs/run/samples.jsonl"], "Split 'test' not found"),
    (["score", "--dataset_name", "data/vicuna_rated.jsonl", "--dataset_split", "test", "--reward_funcs",
      "sorted_digits", "--output", "outputs/run/rated.jsonl"], "Split 'test' not found"),
    (["iterate", "--config", "recipes/tiny/iterate_nca.yaml", "--model_name_or_path", "model", "--output_dir",
      "outputs/run", "--prompts_per_round", "1000"], "3 rounds x 1000 prompts need 3000 training prompts"),
], ids=["train-split", "train-file-type", "train-format-kwargs", "train-format", "train-eval-strategy", "train-generate-folder", "train-eval-fraction",
        "generate-split",
        "score-split", "iterate-prompts"])
def test_a_bad_setting_found_at_run_time_is_one_line_exit_2_and_leaves_nothing(folder, argv, message, capsys):
    assert message in refused(argv, capsys)
    assert not (folder / "outputs").exists()


def test_a_max_length_no_prompt_fits_is_one_line(folder, tiny_mistral, capsys):
    """Found once the tokenizer has counted the prompts (before: a traceback, exit 1, an empty output folder)."""
    err = refused([*TRAIN, "--model_name_or_path", str(tiny_mistral), "--max_length", "4"], capsys)
    assert err.startswith("train dataset: every one of its 72 rows would be dropped") and "raise `max_length`" in err
    assert not (folder / "outputs").exists()


def test_a_failed_run_keeps_an_output_dir_that_was_there(folder, capsys):
    (folder / "outputs" / "run").mkdir(parents=True)
    refused([*TRAIN, "--dataset_train_split", "nosplit"], capsys)
    assert (folder / "outputs" / "run").is_dir()


@pytest.mark.parametrize("command", ["train", "score"])
def test_a_bad_row_or_data_file_is_one_line_exit_2_and_leaves_nothing(command, folder, tiny_mistral, capsys):
    """A row the trainers cannot use (dataset, row, field, fix) and a truncated data file (file, line, fix) are found
    before anything is written or loaded: their message alone, as a refused setting's (before: a traceback through
    the data package, exit 1)."""
    good = '{"prompt": "hi", "completions": ["a", "b"], "rewards": [1, 2]}\n'
    (folder / "bad.jsonl").write_text(good * 14 + '{"prompt": "hi", "completions": ["a", "b", "c"], "rewards": [1, 2]}\n'
                                      + good * 5)
    (folder / "cut.jsonl").write_text('{"prompt": "hi", "completions": ["a", "b"], "rewards": [1, 2]}\n{"prompt": "h')
    argv = ([*TRAIN, "--model_name_or_path", str(tiny_mistral)] if command == "train" else
            ["score", "--reward_funcs", "sorted_digits", "--output", "outputs/run/rated.jsonl"])
    if command == "train":
        # Named by its line in the file (row 14), not by its place in the split `eval_fraction` shuffled it into
        assert re.fullmatch(r"(train|eval) dataset, row 14, field 'rewards': 3 completions but 2 rewards\. Fix: give "
                            r"exactly one reward per completion, in the same order\.",
                            refused([*argv, "--dataset_name", "bad.jsonl"], capsys))
        # Rewards written as strings in some rows only: datasets reads the column as JSON values and made "1" the
        # number 1 without a word (the trainers refuse every string), so the run trained
        (folder / "strings.jsonl").write_text(good * 3 + '{"prompt": "h", "completions": ["a", "b"], "rewards": '
                                              '["1", "0"]}\n')
        assert refused([*argv, "--dataset_name", "strings.jsonl"], capsys).startswith(
            "strings.jsonl: column 'rewards' holds a number in line 1 but a string in line 4 (position 0): '1' "
            "(strings among numbers)")
        (folder / "one.jsonl").write_text(good)  # and a split that leaves nothing to train on is refused as such
        assert refused([*argv, "--dataset_name", "one.jsonl"], capsys).startswith(
            "`eval_fraction: 0.1` of the 1 training row(s) holds 1 out and leaves none to train on")
    assert refused([*argv, "--dataset_name", "cut.jsonl"], capsys).startswith(
        "cut.jsonl, line 2: the last line ends before its JSON object does")
    assert not (folder / "outputs").exists()


def test_generate_and_score_bad_rows_are_one_line_too(folder, tiny_mistral, capsys):
    """An empty prompt for `nca-trl generate` and a row without completions for `nca-trl score` are bad rows like
    train's: their message alone, exit 2, no output (they were a ValueError / TypeError traceback, exit 1)."""
    (folder / "p.jsonl").write_text('{"prompt": "hi"}\n{"prompt": ""}\n')
    assert refused(["generate", "--model_name_or_path", str(tiny_mistral), "--dataset_name", "p.jsonl", "--output",
                    "outputs/run/s.jsonl", "--num_completions", "2", "--max_new_tokens", "4"], capsys) == (
        "p.jsonl, row 1, field 'prompt': the prompt is empty. Give the row a prompt or remove it.")
    (folder / "s.jsonl").write_text('{"prompt": "hi", "completions": "one string"}\n')
    assert refused(["score", "--dataset_name", "s.jsonl", "--reward_funcs", "ascii_letters", "--output",
                    "outputs/run/rated.jsonl"], capsys) == "row 0: `completions` is str, expected a list of completions."
    # Data without the columns a command reads (pairs to score, rows without prompts to sample): a ValueError
    # traceback, exit 1, before
    (folder / "pairs.jsonl").write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')
    assert refused(["score", "--dataset_name", "pairs.jsonl", "--reward_funcs", "ascii_letters", "--output",
                    "outputs/run/rated.jsonl"], capsys).startswith("pairs.jsonl has no `completions` column")
    (folder / "np.jsonl").write_text('{"question": "hi"}\n')
    generate = ["generate", "--model_name_or_path", str(tiny_mistral), "--output", "outputs/run/s.jsonl",
                "--num_completions", "2", "--max_new_tokens", "4", "--dataset_name"]
    assert refused([*generate, "np.jsonl"], capsys).startswith("The prompts need a `prompt` column")
    # A chat prompt whose every message is empty: sampled by generate, then refused by score (in `nca-trl iterate`,
    # at a round's scoring, after its sampling)
    (folder / "c.jsonl").write_text('{"prompt": [{"role": "user", "content": "hi"}]}\n'
                                    '{"prompt": [{"role": "user", "content": ""}]}\n')
    assert refused([*generate, "c.jsonl"], capsys) == (
        "c.jsonl, row 1, field 'prompt': the prompt has empty content in every message. Give the row a prompt or "
        "remove it.")
    assert not (folder / "outputs").exists()
